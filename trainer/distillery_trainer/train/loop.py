"""One training run, every rank: data → guards → models → steps (with checkpoints and progress) → the
student on disk → DPO when asked.

One hand-written loop serves sft, seqkd, kd (top-k or online teacher) and onPolicy (:mod:`.onpolicy`), so every method gets the same
per-token loss (:mod:`.losses`), exact resume (weights, optimizer, RNG and data position from the step), a
time budget, the NaN guard and rank-0-only writes. TRL's trainers were the model for its shape; its DPO
trainer runs the optional DPO phase (:mod:`.dpo`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import outputs
from ..api.stage import StageConfig
from ..api.summaries import TrainingProgress
from ..data.shards import DataError, read_answers, select_seqkd
from ..data.topk import TopKReader, shard_files
from ..layout import RunLayout, atomic_write_json
from ..models import materialize
from . import checkpoint, onpolicy
from .baseline import write_baseline
from .batching import make_plan
from .distributed import DistEnv
from .examples import ChatFormat, Example, build_examples
from .guards import TrainingError, check_online_tokenizer, check_topk_tokenizer
from .losses import DistillConfig
from .modeling import (
    Objective,
    apply_lora,
    autocast_dtype,
    load_causal_lm,
    save_student,
    source_dtype,
    wrap,
)
from .progress import ProgressReporter
from .steps import make_optimizer, pad_token_id, run_steps
from .vllm_sampler import EngineSettings, choose_sampler

log = logging.getLogger(__name__)


def artifacts_root(artifacts: str) -> Path:
    if artifacts.startswith("file://"):
        return Path(artifacts[len("file://") :])
    if "://" in artifacts:
        raise TrainingError(
            f"artifacts {artifacts!r}: the train stage needs the run's artifacts on a mounted volume "
            "(spec.storage.pvc, or a local directory); object-store URLs are not supported for training"
        )
    return Path(artifacts)


def kd_source(cfg: StageConfig) -> str | None:
    training, teacher = cfg.spec.training, cfg.spec.teacher
    if training.method != "kd":
        return None
    if training.kd.source != "auto":
        return training.kd.source
    return "topk" if teacher.logprobs is not None else "online"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingRun:
    def __init__(self, cfg: StageConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.spec = cfg.spec
        self.training = cfg.spec.training
        self.env = env
        self.layout = RunLayout(artifacts_root(cfg.artifacts))
        self.source = kd_source(cfg)
        self.cache_dir = (
            Path(cfg.cache_dir) / "models" if cfg.cache_dir else self.layout.root / "cache" / "models"
        )
        self.reporter = ProgressReporter(
            self.layout.progress_file,
            TrainingProgress(method=self.training.method, world_size=env.world_size, gpus=env.gpus),
            enabled=env.is_main,
        )

    # ------------------------------------------------------------------------------------- the run

    def run(self) -> TrainingProgress:
        try:
            if self.env.is_main:  # rank 0 settles the volume for every rank and node
                outputs.require(self.layout, "collect", self.spec, by="train")
                outputs.claim(self.layout, "train", self.spec, log.info)
            self.env.barrier()
            if self._already_done():
                return self.reporter.progress
            seed_everything(self.training.seed)
            self._run()
        except Exception as exc:
            self.reporter.finish("Failed", str(exc)[:2000])
            raise
        return self.reporter.progress

    def _already_done(self) -> bool:
        path = self.layout.progress_file
        if not (path.exists() and (self.layout.student_dir / "config.json").exists()):
            return False
        last = checkpoint.latest(self.layout.checkpoints_dir)
        state = checkpoint.read_state(last) if last else {}
        done = bool(state.get("finished")) and (not self.training.dpo.enabled or bool(state.get("dpoDone")))
        if done:
            self.reporter.progress = TrainingProgress.model_validate_json(path.read_text(encoding="utf-8"))
            log.info("training already finished (%s): nothing to do", last)
        return done

    def _materialize(self, ref: str, prune: int | None = None) -> str:
        """Rank 0 converts/prunes into the cache first; the others then find it there."""
        base = self.layout.root
        if self.env.is_main:
            path = materialize(ref, self.cache_dir, base_dir=base, prune=prune)
        self.env.barrier()
        if not self.env.is_main:
            path = materialize(ref, self.cache_dir, base_dir=base, prune=prune)
        return path

    def _run(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        t = self.training
        env = self.env
        student_path = self._materialize(
            self.spec.student.model, self.spec.student.prune.keep_layers if self.spec.student.prune else None
        )
        tokenizer = AutoTokenizer.from_pretrained(self.spec.student.tokenizer or student_path)
        student_config = AutoConfig.from_pretrained(student_path)
        chat = ChatFormat(tokenizer, _eos_ids(student_config))
        teacher_path = teacher_chat = None
        if self.source == "online":
            assert self.spec.teacher.self_hosted is not None
            teacher_path = self._materialize(self.spec.teacher.self_hosted.model)
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
            check_online_tokenizer(teacher_tokenizer, tokenizer)
            teacher_chat = ChatFormat(teacher_tokenizer, _eos_ids(AutoConfig.from_pretrained(teacher_path)))

        examples = self._examples(chat, teacher_chat, int(student_config.get_text_config().vocab_size))
        plan = make_plan(
            examples,
            batch_size=t.batch_size,
            world_size=env.world_size,
            accumulation=t.gradient_accumulation_steps,
            seed=t.seed,
            packing=t.packing,
            max_len=t.max_seq_length,
        )
        total = t.max_steps or plan.total_steps(t.epochs)
        self.reporter.update(force=True, total_steps=total, state="Running", message=None)

        compute = autocast_dtype(t.precision, env.device)
        # FSDP: load on the CPU; fully_shard then moves each layer's shard to the GPU, one layer at a time,
        # so a model that does not fit one GPU never has to.
        sharded = env.distributed and t.strategy == "fsdp"
        student = load_causal_lm(student_path, torch.device("cpu") if sharded else env.device)
        write_baseline(self, student, chat, sharded)  # the untrained student's answers, before step 1
        if t.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            student.config.use_cache = False
        if self.spec.student.lora is not None:
            student = apply_lora(student, self.spec.student.lora)
        kd = t.kd
        loss_config = DistillConfig(
            temperature=kd.temperature,
            alpha=kd.alpha,
            divergence=kd.divergence,
            jsd_beta=kd.jsd_beta,
            chunk_tokens=kd.chunk_tokens,
        )
        if t.method == "onPolicy":
            loss_config = onpolicy.loss_config(t.on_policy)
        objective = Objective(student, loss_config)
        module = wrap(objective, t.strategy, env, compute)
        policy = None
        if t.method == "onPolicy":
            scorer = onpolicy.make_scorer(self.cfg)
            onpolicy.check_teacher_tokenizer(self.cfg, scorer, tokenizer)
            policy = onpolicy.OnPolicySteps(
                t.on_policy,
                seed=t.seed,
                env=env,
                examples=examples,
                chat=chat,
                scorer=scorer,
                pad_id=pad_token_id(tokenizer),
                vocab=objective.vocab,
                fsdp=env.distributed and t.strategy == "fsdp",
                total_steps=total,
                engine=self._sampler_engine(student_path, student_config, compute),
            )
        teacher = None
        vocab = None
        if teacher_path is not None:
            teacher = (
                load_causal_lm(teacher_path, env.device, compute or torch.float32)
                .eval()
                .requires_grad_(False)
            )
            vocab = min(objective.vocab, int(teacher.get_output_embeddings().weight.shape[0]))
        optimizer = make_optimizer(module, t.learning_rate, t.weight_decay)

        start = 0
        state: dict[str, Any] = {}
        elapsed0 = 0.0
        tokens_done = 0.0
        last = checkpoint.latest(self.layout.checkpoints_dir)
        finished = False
        if last is not None:
            state = checkpoint.load(last, module, optimizer, env)
            start, elapsed0 = int(state["step"]), float(state.get("elapsedSeconds", 0.0))
            tokens_done = float(state.get("tokens", 0.0))
            finished = bool(state.get("finished"))
            if policy is not None:
                policy.restore(state)
            log.info("resuming from %s (step %d of %d)", last, start, total)
            self.reporter.update(force=True, step=start, elapsed_seconds=elapsed0, loss=state.get("loss"))

        step, elapsed = start, elapsed0
        stop_message = state.get("message") if finished else None
        if not finished:
            step, elapsed, tokens_done, stop_message = run_steps(
                self,
                module,
                optimizer,
                plan,
                examples,
                teacher,
                vocab,
                compute,
                start,
                total,
                elapsed0,
                tokens_done,
                chat,
                policy,
            )
            if policy is not None:
                policy.close()  # the vLLM engine's memory back before the student is saved (and DPO)
            state = {
                "elapsedSeconds": elapsed,
                "tokens": tokens_done,
                "finished": True,
                "method": t.method,
                "loss": self.reporter.progress.loss,
                "message": stop_message,
                **(policy.state() if policy is not None else {}),
            }
            checkpoint.save(self.layout.checkpoints_dir, step, module, optimizer, state, env)
            log.info(
                "rank %d finished %d steps (loss %.4f)",
                env.rank,
                step,
                self.reporter.progress.loss or math.nan,
            )

        meta = {
            "method": t.method,
            "kdSource": self.source,
            "steps": step,
            "loss": self.reporter.progress.loss,
            "student": self.spec.student.model,
            "lora": self.spec.student.lora is not None,
        }
        save_student(
            module,
            tokenizer,
            self.layout.student_dir,
            env=env,
            strategy=t.strategy,
            dtype=source_dtype(student_config),
            end_ids=chat.end_ids,
            meta=meta,
        )
        del module, objective, student, optimizer, teacher
        if t.dpo.enabled:
            from .dpo import run_dpo

            run_dpo(self, tokenizer, chat, student_config)
            last = checkpoint.latest(self.layout.checkpoints_dir)
            if env.is_main and last is not None:
                state = checkpoint.read_state(last)
                state["dpoDone"] = True
                atomic_write_json(last / "state.json", state)
            env.barrier()
        message = "; ".join(m for m in (stop_message, self.reporter.progress.message) if m) or None
        self.reporter.finish("Succeeded", message)

    def _sampler_engine(
        self, student_path: str, student_config: Any, compute: torch.dtype | None
    ) -> EngineSettings | None:
        """The colocated vLLM engine's settings when ``onPolicy.sampler`` resolves to vllm, else None."""
        t, op = self.training, self.training.on_policy
        kind, why = choose_sampler(op, self.env.device)
        log.info("on-policy samples from %s (%s)", "vLLM" if kind == "vllm" else "generate", why)
        if kind != "vllm":
            return None
        longest = t.max_seq_length + op.max_new_tokens
        positions = getattr(student_config.get_text_config(), "max_position_embeddings", None)
        return EngineSettings(
            model=student_path,
            tokenizer=self.spec.student.tokenizer or student_path,
            dtype=compute or torch.float32,
            max_model_len=min(longest, int(positions)) if positions else longest,
            max_num_seqs=min(t.batch_size * op.samples_per_prompt, 512),
            memory_share=op.vllm_gpu_memory_utilization,
            auto=op.sampler == "auto",
        )

    # ------------------------------------------------------------------------------------- data

    def _examples(self, chat: ChatFormat, teacher_chat: ChatFormat | None, model_vocab: int) -> list[Example]:
        t = self.training
        answers = read_answers(self.layout, "train")
        if not answers:
            raise DataError(
                f'no training answers in {self.layout.collect_dir} (shard-*.jsonl lines with split "train"): '
                "run the collection stage first"
            )
        if t.method == "seqkd":
            answers = select_seqkd(answers, t.seqkd.selection)
        topk = None
        if self.source == "topk":
            topk = {}
            for shard in sorted({a.shard for a in answers}):
                if shard_files(self.layout.collect_dir, shard):
                    topk[shard] = TopKReader.for_shard(self.layout.collect_dir, shard)
            if not topk:
                raise DataError(
                    f"training.method kd (top-k) needs the teacher's logprobs ({self.layout.logprobs_file(0).name} "
                    "beside each shard), and collection wrote none: set teacher.logprobs.topK and collect again, "
                    "or use training.method sft"
                )
            check_topk_tokenizer(topk.values(), chat.tokenizer, model_vocab)
        examples, stats = build_examples(
            answers, chat, max_len=t.max_seq_length, topk=topk, teacher=teacher_chat
        )
        for note in stats.notes:
            log.warning("%s", note)
        log.info(
            "%d training examples (%d answer tokens) from %d answers",
            len(examples),
            sum(e.n_answer for e in examples),
            len(answers),
        )
        return examples


def _eos_ids(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None and hasattr(config, "get_text_config"):
        eos = getattr(config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def configure_threads() -> None:
    """One CPU rank per core under torchrun (it sets OMP_NUM_THREADS=1); otherwise torch's default."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
