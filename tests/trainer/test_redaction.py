"""An API key never leaves a stage in clear: plant a key, make the endpoints that hold it refuse it (and
echo it back, as careless servers do), and search everything the stage leaves behind: its output, every
file it wrote, its termination message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support.evalrun import stage_config, write_collected
from tests.support.servers.fake_openai import FakeOpenAI, FakeOpenAIConfig, default_answer

KEY = "sk-planted-0123456789"
ENV = "PLANTED_API_KEY"


def everything_under(root: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()}


def leaks(texts: dict[str, str]) -> list[str]:
    return sorted(name for name, text in texts.items() if KEY in text)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), str(REPO)])
    return {**os.environ, ENV: KEY, "PYTHONPATH": path}


def test_the_evaluate_stage_never_writes_a_key_its_endpoints_echo(tmp_path: Path) -> None:
    """The teacher (latency comparison) and the judge both refuse the planted key and echo it in their
    401: before, the latency's error samples copied the echo into eval/results.json."""
    rows = []
    for k in range(6):
        messages = [{"role": "user", "content": f"q {k}"}]
        rows.append({"id": f"p{k}", "messages": messages, "response": default_answer(messages, 0)})
    write_collected(tmp_path, rows)
    with FakeOpenAI() as student, FakeOpenAI(FakeOpenAIConfig(api_key="sk-the-right-one-000")) as guarded:
        endpoint = {"baseURL": guarded.base_url, "model": "m", "apiKeySecretRef": None, "apiKeyEnv": ENV}
        cfg = stage_config(
            tmp_path,
            student=(student.base_url, "student"),
            teacher=(guarded.base_url, "m"),
            spec={
                "teacher": {"endpoint": endpoint},
                "evaluation": {
                    "judge": {"endpoint": {k: v for k, v in endpoint.items() if k != "apiKeySecretRef"}},
                    "load": {"requests": 4, "concurrency": 2, "compareTeacher": True},
                },
            },
        )
        term = tmp_path / "termination-log"
        out = subprocess.run(
            [sys.executable, "-m", "distillery_trainer.cli", "evaluate", "--config", str(cfg),
             "--termination-log", str(term)],
            capture_output=True, text=True, env=_env(), timeout=300,
        )  # fmt: skip
    assert any(KEY in h for h in guarded.auth_headers)  # the key was sent, and refused
    assert term.exists()
    files = everything_under(tmp_path)
    assert any("http_401" in text for text in files.values())  # the refusal is on record...
    assert leaks({**files, "stdout": out.stdout, "stderr": out.stderr}) == []  # ...the key is not


@pytest.mark.parametrize(
    "code",
    [
        "raise RuntimeError('the server said: Incorrect API key ' + KEY)",  # an uncaught exception
        "import logging; logging.basicConfig(); redact.scrub_handlers()\n"
        "try:\n    raise ValueError(KEY)\nexcept ValueError:\n    logging.getLogger('x').exception('failed')",
        "import logging; logging.getLogger('x').error('sent %s', KEY)",
        "print({'detail': KEY})",
        "import warnings; warnings.warn('key ' + KEY)",
    ],
    ids=["uncaught", "logged-traceback", "log-args", "print", "warning"],
)
def test_a_stage_process_scrubs_its_keys_from_everything_it_prints(code: str) -> None:
    """What every stage command installs first (collect, train, evaluate): the keys it was given are
    masked in anything written to stdout or stderr, tracebacks and logged exceptions included."""
    program = (
        "import logging, os, sys\nfrom distillery_trainer import redact\n"
        f"logging.basicConfig(stream=sys.stderr)\nKEY = os.environ[{ENV!r}]\n"
        f"redact.install([KEY])\n{code}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=_env(), timeout=60
    )
    both = out.stdout + out.stderr
    assert "[redacted]" in both, both
    assert KEY not in both, both


def test_what_looks_like_a_key_is_masked_without_knowing_it() -> None:
    from distillery_trainer.redact import scrub

    for text in (
        f"HTTP 401: Incorrect API key provided: {KEY}",
        f"Authorization: Bearer {KEY}",
        "token hf_abcdefghijklmnop leaked",
        'api_key="0123456789abcdef"',
    ):
        assert "[redacted]" in scrub(text), text
        assert KEY not in scrub(text) and "hf_abcdefghijklmnop" not in scrub(text)
    assert scrub("apiKeySecretRef: openai, 4 shards failed") == "apiKeySecretRef: openai, 4 shards failed"
