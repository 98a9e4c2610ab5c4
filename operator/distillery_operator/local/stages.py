"""The stages of a local run as processes: the collection shards (with a self-hosted teacher on vLLM
meanwhile), training (under torchrun with one process per GPU; one process on a CPU), and the student
served on vLLM while the evaluation runs against it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from distillery_trainer.api.stages import collection_failures
from distillery_trainer.layout import RunLayout
from distillery_trainer.serve.args import score_top_k

from ..builders.common import teacher_in_training
from . import process
from .process import StageFailed
from .servers import serve_model
from .state import (
    TEACHER_NAME,
    LocalRun,
    begin,
    collect_done,
    collection_summaries,
    evaluate_done,
    finish,
    observe,
    train_done,
)


def prompts_args(lr: LocalRun) -> list[str]:
    """``--prompts FILE`` for a prompt source that is a local file (relative to the run file's directory)."""
    from distillery_trainer.collect.prompts import local_prompts_path

    source = lr.run.spec.data.prompts
    if source.config_map_ref is not None:
        raise StageFailed(
            "collect",
            "spec.data.prompts.configMapRef: `distillery run` has no ConfigMap to read: put the JSONL in a "
            "file and set data.prompts.pvcPath (relative to the run file) or url: file:///path/prompts.jsonl",
        )
    path = local_prompts_path(source, lr.spec_dir)
    if path is None:
        return []
    if not path.exists():
        raise StageFailed("collect", f"spec.data.prompts: {path} does not exist")
    return ["--prompts", str(path)]


@contextmanager
def teacher_served(lr: LocalRun, stage: str) -> Iterator[None]:
    """Serve a self-hosted teacher with vLLM for the duration (nothing to do for an endpoint teacher, or
    when it is served already: an on-policy run keeps it from the collection through the training)."""
    sh = lr.run.spec.teacher.self_hosted
    if sh is None or lr.teacher is not None:
        yield
        return
    lr.ui.note(stage, "starting the teacher on vLLM")
    with serve_model(
        ref=sh.model,
        name=TEACHER_NAME,
        cache_dir=lr.cache_dir,
        base_dir=lr.spec_dir,
        log=lr.logs / "teacher-vllm.log",
        stage=stage,
        teacher=sh,
        logprobs=lr.run.spec.teacher.logprobs,
        score_top_k=score_top_k(lr.run.spec),
    ) as served:
        lr.teacher = served
        try:
            yield
        finally:
            lr.teacher = None


def run_collect(lr: LocalRun) -> None:
    spec = lr.run.spec
    extra = prompts_args(lr)
    with teacher_served(lr, "collect"):
        config = lr.write_config()
        if lr.teacher is not None:
            extra += ["--tokenizer", lr.teacher.model_dir]
        procs = []
        try:
            for shard in range(spec.collection.shards):
                argv = [*lr.trainer_cmd(), "collect", "--config", str(config), "--shard", str(shard),
                        "--shards", str(spec.collection.shards), *extra]  # fmt: skip
                procs.append(process.start(argv, lr.logs / f"collect-{shard:05d}.log", lr.stage_env()))
            while any(p.alive() for p in procs):
                observe(lr)
                lr.ui.progress("collect", lr.status.collection)
                lr.write_status()
                time.sleep(1)
        except BaseException:
            for p in procs:
                p.stop()
            raise
        # The totals over every shard, by the rule each shard applied to its own share (and the planner's).
        too_many = collection_failures(
            collection_summaries(lr.layout, spec.collection.shards), spec.collection
        )
        if too_many is not None:
            observe(lr)
            raise StageFailed("collect", too_many, lr.logs / "collect-00000.log")
        for shard, p in enumerate(procs):
            if p.popen.returncode != 0:
                raise StageFailed(
                    "collect",
                    f"shard {shard}: exit code {p.popen.returncode}: {process.last_error_line(p.log)}",
                    p.log,
                )
    observe(lr)
    log = lr.logs / "collect-00000.log"
    if not collect_done(lr.layout, spec):
        raise StageFailed("collect", "the shards ended without a complete summary", log)
    if lr.status.collection.done == 0:
        raise StageFailed("collect", f"the teacher answered no prompt: {first_failure(lr.layout)}", log)


def first_failure(layout: RunLayout) -> str:
    """The reason of the first recorded failure, to say why a collection produced nothing."""
    for path in sorted(layout.collect_dir.glob("failures-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                return str(json.loads(line).get("reason", line))
            except ValueError:
                return line
    return "no failure was recorded"


def gpu_count() -> int:
    """GPUs torch can use here (0 on a machine without one); torch is imported only to ask."""
    import subprocess

    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def run_train(lr: LocalRun) -> None:
    # An on-policy training scores the student's samples with the teacher: a self-hosted one is served
    # for the duration and the stage config names it, as for collection.
    with teacher_served(lr, "train") if teacher_in_training(lr.run.spec) else nothing():
        _train(lr)


def _train(lr: LocalRun) -> None:
    config = lr.write_config()
    wanted = lr.run.spec.training.resources.gpus_per_node
    nproc = min(wanted, gpu_count()) if wanted > 0 else 0
    if nproc > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--module", "distillery_trainer.cli", "train", "--config", str(config)]  # fmt: skip
    else:
        argv = [*lr.trainer_cmd(), "train", "--config", str(config)]
    env = lr.stage_env() if nproc > 0 else {**lr.stage_env(), "CUDA_VISIBLE_DEVICES": ""}

    def tick() -> None:
        observe(lr)
        lr.ui.progress("train", lr.status.training)
        lr.write_status()

    process.run("train", argv, lr.logs / "train.log", env=env, tick=tick)
    if not train_done(lr.layout, lr.run.spec):
        raise StageFailed("train", "training ended without a student", lr.logs / "train.log")


def run_serve_and_evaluate(lr: LocalRun, keep_serving: bool) -> None:
    spec = lr.run.spec
    begin(lr, "serve")
    lr.status.serving.replicas = 1
    with serve_model(
        ref=str(lr.layout.student_dir),
        name=lr.name,
        cache_dir=lr.cache_dir,
        base_dir=lr.spec_dir,
        log=lr.logs / "student-vllm.log",
        stage="serve",
        serving=spec.serving,
    ) as student:
        lr.student = student
        lr.status.serving.ready_replicas = lr.status.serving.done = 1
        lr.status.serving.total = 1
        lr.status.endpoint = student.base_url
        finish(lr, "serve", f"student served at {student.base_url}")
        if evaluate_done(lr.layout, spec):
            finish(lr, "evaluate", "reused eval/results.json", skipped=True)
        else:
            begin(lr, "evaluate")
            compare = spec.evaluation.load.compare_teacher
            ctx = teacher_served(lr, "evaluate") if compare else nothing()
            with ctx:
                config = lr.write_config()
                process.run("evaluate", [*lr.trainer_cmd(), "evaluate", "--config", str(config)],
                            lr.logs / "evaluate.log")  # fmt: skip
            finish(lr, "evaluate", "results in eval/results.json")
        if keep_serving:
            lr.ui.serving(student.base_url, lr.name)
            student.wait()
    if not keep_serving:
        lr.status.endpoint = None
        lr.status.serving.ready_replicas = 0


@contextmanager
def nothing() -> Iterator[None]:
    yield
