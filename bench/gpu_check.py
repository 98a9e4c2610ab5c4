"""The trainer on a GPU: what was run on the lent H200 (see the README's figures). Two halves:

    python bench/gpu_check.py prepare RUN_DIR   # here: copy a CPU run's collection + SmolLM2's config and
                                                #   tokenizer (no weights) into .gpu/ (git-ignored, ~5 MB)
    python bench/gpu_check.py run OUT_DIR [--smoke]   # there: build a 15-layer SmolLM2-shaped student (random
                                                #   weights: the 540 MB teacher does not travel), then
                                                #   `distillery-trainer train` under torchrun (NCCL) for
                                                #   sft, kd (top-20), fsdp, lora and sft+dpo on the same
                                                #   collected answers, and print a table

RUN_DIR is a finished `distillery run`/`distillery demo` artifacts directory whose collection has top-k
logprobs (examples/local-cpu.yaml collects top-20). Each case checks that the saved student loads with
``from_pretrained`` and reports steps, first and last loss, tokens/s, wall time and the GPU's peak memory
(nvidia-smi, sampled). A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STASH = ROOT / ".gpu"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                   "generation_config.json")  # fmt: skip

CASES: dict[str, dict[str, Any]] = {
    "sft": {"method": "sft", "maxSteps": 60},
    "kd": {"method": "kd", "maxSteps": 60},
    "fsdp": {"method": "sft", "maxSteps": 30, "strategy": "fsdp"},
    "lora": {"method": "sft", "maxSteps": 30, "learningRate": 1.0e-3},
    "dpo": {"method": "sft", "maxSteps": 30, "dpo": {"enabled": True, "pairs": 64, "epochs": 1.0}},
}


def prepare(run_dir: Path) -> None:
    stage = yaml.safe_load((run_dir / "stage.yaml").read_text())
    models = Path(stage["cacheDir"]) / "models"
    teacher = next(p for p in sorted(models.iterdir()) if p.is_dir() and "keep" not in p.name)
    shutil.rmtree(STASH, ignore_errors=True)
    (STASH / "tokenizer").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (teacher / name).exists():
            shutil.copy2(teacher / name, STASH / "tokenizer" / name)
    shutil.copytree(run_dir / "collect", STASH / "collect")
    (STASH / "stage.yaml").write_text((run_dir / "stage.yaml").read_text())
    size = sum(f.stat().st_size for f in STASH.rglob("*") if f.is_file())
    print(f"{STASH}: {size / 2**20:.1f} MB (teacher {teacher.name}: config and tokenizer only)")


def build_student(out: Path, keep_layers: int = 15) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(STASH / "tokenizer")
    config.num_hidden_layers = keep_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(STASH / "tokenizer").save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"student: SmolLM2-135M's shape with {keep_layers} of 30 layers, {n / 1e6:.0f}M parameters, random weights"
    )
    return out


class GpuMemory:
    """Peak used GPU memory over a case, sampled from nvidia-smi every 0.5 s."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                ).stdout.split()
            except FileNotFoundError:  # no GPU here (a --smoke run)
                return
            if out:
                self.peak_mib = max(self.peak_mib, int(out[0]))
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_case(name: str, training: dict[str, Any], student: Path, work: Path, out: Path) -> dict[str, Any]:
    stage = yaml.safe_load((STASH / "stage.yaml").read_text())
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(STASH / "collect", root / "collect")
    spec = stage["spec"]
    spec["student"] = {"model": str(student)}
    if name == "lora":
        spec["student"]["lora"] = {"rank": 16}
    t = spec["training"]
    t.update({"batchSize": 32, "learningRate": 5.0e-4, "maxSeconds": 600, "epochs": 20.0,
              "resources": {"nodes": 1, "gpusPerNode": 1}})  # fmt: skip
    t.update(training)
    stage.update({"artifacts": str(root), "cacheDir": str(work / "cache")})
    config = root / "stage.yaml"
    config.write_text(yaml.safe_dump(stage, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "distillery_trainer.cli", "train", "--config", str(config)]  # fmt: skip
    env = {**os.environ, "DISTILLERY_TERMINATION_LOG": str(root / "termination.log")}
    start = time.perf_counter()
    with GpuMemory() as mem, open(out / f"train-{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    progress = json.loads((root / "train" / "progress.json").read_text()) if rc == 0 else {}
    losses = _losses(out / f"train-{name}.log")
    loads = False
    if rc == 0:
        from transformers import AutoModelForCausalLM

        loads = AutoModelForCausalLM.from_pretrained(root / "student") is not None
        loads = loads and not (root / "student" / "adapter_config.json").exists()
    return {"case": name, "rc": rc, "wall": wall, "peakMiB": mem.peak_mib, "progress": progress,
            "losses": losses, "studentLoads": loads}  # fmt: skip


def _losses(log: Path) -> list[float]:
    """The loss figures the trainer logged (``loss 1.234``), in order."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.replace(",", " ").split()
        for i, word in enumerate(parts[:-1]):
            if word == "loss":
                with contextlib.suppress(ValueError):
                    found.append(float(parts[i + 1]))
    return found


def run(out: Path, smoke: bool = False) -> int:
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU: the CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device}")
    work = Path("/tmp/distillery-gpu")
    shutil.rmtree(work, ignore_errors=True)
    student = build_student(work / "student")
    results = []
    for name, training in CASES.items():
        if smoke:  # a dry run of the script on a machine without a GPU: two steps each
            training = {**training, "maxSteps": 2, "resources": {"nodes": 1, "gpusPerNode": 0}}
            if "dpo" in training:
                training["dpo"] = {**training["dpo"], "pairs": 4}
        r = run_case(name, training, student, work, out)
        results.append(r)
        p = r["progress"]
        first = f"{r['losses'][0]:.2f}" if r["losses"] else "-"
        last = f"{p.get('loss', float('nan')):.3f}" if p else "-"
        tps = f"{p.get('tokensPerSecond', 0):,.0f}" if p else "-"
        print(
            f"  {name:<5} rc {r['rc']}  steps {p.get('step', '-'):>3}  loss {first} -> {last}  {tps} tok/s  "
            f"wall {r['wall']:.0f} s  GPU peak {r['peakMiB']:,} MiB  student loads: {r['studentLoads']}",
            flush=True,
        )
    (out / "gpu_train.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 and r["studentLoads"] for r in results) else 1


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    if len(args) != 2 or args[0] not in ("prepare", "run"):
        print(__doc__)
        return 2
    if args[0] == "prepare":
        prepare(Path(args[1]))
        return 0
    return run(Path(args[1]), smoke="--smoke" in sys.argv)


if __name__ == "__main__":
    sys.exit(main())
