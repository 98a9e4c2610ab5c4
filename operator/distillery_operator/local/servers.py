"""vLLM servers the local executor starts: the self-hosted teacher (for collection, an on-policy training
and the latency comparison) and the trained student. Same argument builder as the operator's Deployments, same launcher
as ``distillery-trainer serve``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distillery_trainer.api.spec import Logprobs, SelfHostedTeacher, Serving
from distillery_trainer.serve.args import VllmServer
from distillery_trainer.serve.launcher import VllmLauncher, VllmNotInstalled, VllmStartError, installed_build

from .process import StageFailed


@dataclass
class Served:
    name: str
    model_dir: str
    launcher: VllmLauncher

    @property
    def base_url(self) -> str:
        return self.launcher.base_url

    def wait(self) -> None:
        if self.launcher.proc is not None:
            self.launcher.proc.wait()


@contextmanager
def serve_model(
    *,
    ref: str,
    name: str,
    cache_dir: Path,
    base_dir: Path,
    log: Path,
    stage: str,
    teacher: SelfHostedTeacher | None = None,
    logprobs: Logprobs | None = None,
    serving: Serving | None = None,
    score_top_k: int = 0,
    timeout: float = 900.0,
) -> Iterator[Served]:
    """Serve ``ref`` (a model directory, .gguf or pkg:// reference) on a free local port for the duration;
    ``score_top_k``: the prompt logprobs an on-policy training asks of a teacher (its ``--max-logprobs``)."""
    import os

    from distillery_trainer.models import ModelNotFound, materialize

    os.environ.setdefault("TQDM_DISABLE", "1")  # the one-off GGUF conversion's bars would garble the UI
    try:
        model = materialize(ref, cache_dir / "models", base_dir=base_dir)
        build = installed_build()
    except (ModelNotFound, ValueError, VllmNotInstalled) as exc:
        raise StageFailed(stage, str(exc)) from None
    gpu = build == "gpu"
    if teacher is not None:
        server = VllmServer.for_teacher(teacher, logprobs, model, name, gpu=gpu, score_top_k=score_top_k)
    else:
        server = VllmServer.for_student(serving or Serving(), model, name, gpu=gpu)
    server = dataclasses.replace(server, host="127.0.0.1", port=0)
    launcher = VllmLauncher(server, build=build, log_path=log, startup_timeout=timeout,
                            extra_env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        launcher.start()
    except VllmStartError as exc:
        raise StageFailed(stage, f"vLLM for {name}: {str(exc).splitlines()[0]}", log) from None
    try:
        yield Served(name=name, model_dir=model, launcher=launcher)
    finally:
        launcher.stop()
