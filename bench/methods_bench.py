"""Distillation methods, side by side: SFT (the baseline), KD on the teacher's top-20 logprobs and on-policy
distillation, on the same task, teacher, student, collection and training budget, each a whole `distillery
run` on this machine (vLLM on the CPU for the teacher and the student, the trainer, the evaluation).

    python bench/methods_bench.py                        # ~22 min on 2 quiet CPU cores
    python bench/methods_bench.py --steps 16 --seconds 120 --prompts 80    # a quicker look
    python bench/methods_bench.py --json out.json

The task is harder than the demo's (where SFT already retains 1.0): four fields per contract clause, the
date, the kind of agreement and both parties, as ``date | kind | party | party`` (one-shot, like the demo),
scored by token F1 against the generator's reference (retention = student F1 / teacher F1 on the held-out
prompts, with the evaluation's bootstrap interval). SmolLM2-135M-Instruct (GGUF Q4_1) teaches a copy of
itself pruned to 15 of its 30 layers, as in the demo.

The teacher's answers are collected once (the first run) and reused by the others (the collection's
inputs do not depend on the method). Every method gets the same budget: ``--steps`` optimizer steps of
``batchSize`` prompts, capped at ``--seconds`` of training; the table says how many steps each one did.
Teacher tokens: those it generated in the collection (every method trains after it; the held-out split
is scored against the same answers) and those it scored during an on-policy training (prefill only:
``prompt_logprobs`` of the student's samples). The final loss is each method's own (cross-entropy for sft,
the KD mix for kd, the per-token divergence plus the anchor's cross-entropy for on-policy): not comparable across methods, shown as the
trainer reported it. This is a benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer")]

METHODS = ("sft", "kd", "onPolicy")
EXAMPLE_CLAUSE = "This Lease Agreement is made on April 2, 2019 between Foo Inc. and Bar LLC."
EXAMPLE_ANSWER = "April 2, 2019 | Lease Agreement | Foo Inc. | Bar LLC"
ASK = "Date | Agreement | First party | Second party:"


def task(n: int, seed: int = 11) -> list[dict[str, Any]]:
    """Prompts with their four-field references (the demo's clauses, every field asked for)."""
    from distillery_operator.demo.task import KINDS, MONTHS, PARTIES, TEMPLATES

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2015, 2025)}"
        a, b = rng.sample(PARTIES, 2)
        kind = rng.choice(KINDS)
        clause = rng.choice(TEMPLATES).format(kind=kind, date=date, a=a, b=b)
        rows.append(
            {
                "id": f"fields-{i:04d}",
                "messages": [
                    {"role": "user", "content": f"Clause: {EXAMPLE_CLAUSE}\n{ASK}"},
                    {"role": "assistant", "content": EXAMPLE_ANSWER},
                    {"role": "user", "content": f"Clause: {clause}\n{ASK}"},
                ],
                "reference": f"{date} | {kind} | {a} | {b}",
            }
        )
    return rows


def run_file(work: Path, method: str, prompts: Path, args: argparse.Namespace) -> Path:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "local-cpu.yaml").read_text())
    doc["metadata"]["name"] = "bench"
    spec = doc["spec"]
    spec["teacher"]["sampling"]["maxTokens"] = 32
    spec["data"]["prompts"] = {"pvcPath": str(prompts)}
    t = spec["training"]
    t.update(method=method, maxSteps=args.steps, maxSeconds=args.seconds)
    t["onPolicy"] = {"maxNewTokens": 32, "topK": 20}  # the spec's defaults otherwise (lmbda, warm-up, ...)
    if args.lmbda is not None:
        t["onPolicy"]["lmbda"] = args.lmbda
    if args.warmup is not None:
        t["onPolicy"]["offPolicyWarmup"] = args.warmup
    if args.sft_weight is not None:
        t["onPolicy"]["sftWeight"] = args.sft_weight
    if args.off_policy_divergence is not None:
        t["onPolicy"]["offPolicyDivergence"] = args.off_policy_divergence
    if args.divergence is not None:
        t["onPolicy"]["divergence"] = args.divergence
    ev = spec["evaluation"]
    ev.update(metrics=["token_f1", "exact_match"], baseline=False)
    ev["load"] = {"requests": 8, "concurrency": 4, "compareTeacher": False}
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_one(
    work: Path, method: str, prompts: Path, args: argparse.Namespace, first: Path | None
) -> dict[str, Any]:
    spec = run_file(work, method, prompts, args)
    workdir = work / method
    root = workdir / "bench"
    if first is not None:  # the same collection: the teacher's answers, its held-out split, the model cache
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(first / "bench" / "collect", root / "collect", dirs_exist_ok=True)
        if not (workdir / ".cache").exists():
            (workdir / ".cache").symlink_to((first / ".cache").resolve())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer")])}  # fmt: skip
    started = time.monotonic()
    with (work / f"{method}.log").open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "distillery_operator.cli", "run", str(spec), "--workdir", str(workdir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, check=False,
        )  # fmt: skip
    wall = time.monotonic() - started
    status = json.loads((root / "status.json").read_text())
    progress = json.loads((root / "train" / "progress.json").read_text())
    results = status.get("results") or {}
    collection = status.get("collection") or {}
    interval = results.get("retentionInterval") or {}
    return {
        "method": method,
        "exit": proc.returncode,
        "phase": status.get("phase"),
        "steps": progress.get("step"),
        "trainSeconds": progress.get("elapsedSeconds"),
        "loss": progress.get("loss"),
        "retention": results.get("qualityRetention"),
        "interval": [interval.get("low"), interval.get("high")],
        "studentScore": results.get("studentScore"),
        "teacherScore": results.get("teacherScore"),
        "teacherTokensGenerated": collection.get("outputTokens"),
        "teacherTokensPrompted": collection.get("inputTokens"),
        "teacherTokensScored": progress.get("teacherTokensScored") or 0,
        "teacherScoringSeconds": progress.get("teacherScoringSeconds") or 0.0,
        "runSeconds": round(wall, 1),
    }


def _f(x: Any, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["method"] == "sft")
    out = [
        "| method | steps | train s | final loss (own) | retention (F1) [95 % interval] | vs SFT | teacher tokens "
        "generated + scored | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["interval"]
        ratio = (
            f"{r['retention'] / base['retention']:.2f}×"
            if r["retention"] is not None and base["retention"]
            else "—"
        )
        tokens = f"{r['teacherTokensGenerated'] or 0:,} + {r['teacherTokensScored']:,}"
        out.append(
            f"| {r['method']}{' (baseline)' if r is base else ''} | {r['steps']} | {_f(r['trainSeconds'], '.0f')} "
            f"| {_f(r['loss'], '.4f')} | {_f(r['retention'])} [{_f(lo)}, {_f(hi)}] | {ratio} | {tokens} "
            f"| {r['runSeconds']:.0f} |"
        )
    teacher = base["teacherScore"]
    out.append(f"\nteacher F1 on the held-out prompts: {_f(teacher)}; students' F1: "
               + ", ".join(f"{r['method']} {_f(r['studentScore'])}" for r in rows))  # fmt: skip
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=120, help="prompts (a quarter held out)")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps, every method")
    parser.add_argument("--seconds", type=int, default=480, help="training wall-time cap, every method")
    parser.add_argument("--lmbda", type=float, default=None, help="on-policy share (default: the spec's)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="offPolicyWarmup, share of the steps (default: the spec's)"
    )
    parser.add_argument(
        "--sft-weight", type=float, default=None, help="onPolicy.sftWeight, the anchor (default: the spec's)"
    )
    parser.add_argument(
        "--off-policy-divergence",
        choices=["none", "forwardKL", "reverseKL", "jsd"],
        default=None,
        help="onPolicy.offPolicyDivergence (default: the spec's)",
    )
    parser.add_argument(
        "--divergence",
        choices=["reverseKL", "jsd"],
        default=None,
        help="onPolicy.divergence (default: the spec's)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if "sft" not in args.methods:
        parser.error("sft is the baseline: keep it in --methods")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="methods-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "fields.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in task(args.prompts)))
    rows: list[dict[str, Any]] = []
    first: Path | None = None
    for method in ["sft", *[m for m in args.methods if m != "sft"]]:
        print(f"{method}: running (log: {work / (method + '.log')})", flush=True)
        row = run_one(work, method, prompts, args, first)
        first = first or work / method
        print(f"{method}: {json.dumps(row)}", flush=True)
        rows.append(row)
    print()
    from distillery_trainer.api.spec import OnPolicy

    op = OnPolicy()
    lmbda = op.lmbda if args.lmbda is None else args.lmbda
    warmup = op.off_policy_warmup if args.warmup is None else args.warmup
    weight = op.sft_weight if args.sft_weight is None else args.sft_weight
    off = op.off_policy_divergence if args.off_policy_divergence is None else args.off_policy_divergence
    divergence = op.divergence if args.divergence is None else args.divergence
    print(f"budget: {args.steps} steps of 16 prompts, capped at {args.seconds} s of training; "
          f"{args.prompts} prompts; on-policy: lmbda {lmbda} after {warmup:.0%} of the steps off-policy "
          f"({off}), {divergence}, sftWeight {weight}")  # fmt: skip
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
