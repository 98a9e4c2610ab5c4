"""The launcher: a real vLLM (CPU build) started and stopped through `distillery-trainer serve`, and
its start-up failure and stop escalation against stand-in processes (seconds, not a minute)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from distillery_trainer.serve.args import VllmServer
from distillery_trainer.serve.launcher import VllmLauncher, VllmStartError, installed_build

# Stands in for `python -m vllm.entrypoints.openai.api_server ... --port N`: serves /health on N.
HEALTHY = """
import http.server, os, signal, sys
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
print("stand-in up", flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _python(tmp_path: Path, body: str) -> str:
    """An executable the launcher runs in place of python: it receives `-m MODULE ARGS...`."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} -c '{body}' \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _server(tmp: Path | str = "m") -> VllmServer:
    return VllmServer(model=str(tmp), served_model_name="m", host="127.0.0.1", port=0)


def test_a_server_that_dies_while_starting_is_reported_with_its_last_lines(tmp_path: Path) -> None:
    body = (
        'print("loading"); print("ValueError: No available memory for the cache blocks"); raise SystemExit(3)'
    )
    launcher = VllmLauncher(
        _server(), build="cpu", python=_python(tmp_path, body), log_path=tmp_path / "v.log"
    )
    with pytest.raises(VllmStartError) as err:
        launcher.start()
    msg = str(err.value)
    assert "exited with code 3" in msg and "No available memory" in msg and "--kv-cache-gib" in msg
    assert "loading" in (tmp_path / "v.log").read_text()


def test_context_manager_waits_for_health_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    launcher = VllmLauncher(
        _server(),
        build="cpu",
        python=_python(tmp_path, HEALTHY),
        stop_timeout=1.0,
        extra_env={"IGNORE_TERM": "1"},
    )
    assert "--enforce-eager" in launcher.argv() and launcher.env()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with launcher as running:
        assert running.proc is not None and running.proc.poll() is None
        pid = running.proc.pid
    assert launcher.proc is not None and launcher.proc.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.mark.slow
def test_serve_starts_real_vllm_answers_and_stops_on_sigterm(smollm2_dir: Path, tmp_path: Path) -> None:
    assert installed_build() == "cpu"  # this machine has vllm-cpu: the CPU build is chosen by itself
    cmd = [sys.executable, "-m", "distillery_trainer.cli", "serve", "--model", str(smollm2_dir),
           "--name", "student", "--port", "0", "--max-model-len", "512", "--dtype", "bfloat16",
           "--quiet", "--log", str(tmp_path / "vllm.log")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()  # blocks until ready (or the process ends)
            assert "ready at http://127.0.0.1:" in line, (
                line,
                proc.stderr.read() if proc.poll() is not None else "",
            )
            base_url = line.split("ready at ")[1].split()[0]
            client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
            r = client.chat.completions.create(
                model="student",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=4,
                temperature=0,
            )
            assert r.choices[0].message.content
            port = int(base_url.split(":")[2].split("/")[0])
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            assert time.monotonic() - start < 30
            assert "stopping vLLM" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    pid = _vllm_pid(tmp_path / "vllm.log")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(int(pid), 0)  # vLLM's process group (its engine process included) is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def _vllm_pid(log: Path) -> str | None:
    """vLLM logs its own pid as (APIServer pid=N)."""
    import re

    m = re.search(r"\(APIServer pid=(\d+)\)", log.read_text(errors="replace"))
    return m.group(1) if m else None
