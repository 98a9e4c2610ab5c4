"""The operator against the Kubernetes API emulator: latency, throughput and memory, beside a no-op kopf
operator measured in the same run.

    python bench/operator_bench.py [--latency-samples 40] [--sizes 1,100,500]

- apply -> first child: from the POST of a DistillationRun to the API server's receipt of its first child
  (the ConfigMap), one run at a time; p50 and p95;
- runs reconciled per second: N runs posted at once (N = 1, 100, 500); the clock stops when the last
  one's status says Collecting (its ConfigMap and collection Job exist and its status is written);
- RSS: both operators' resident memory (current and peak) after each batch, and the ratio.

Goals (issue 3): p95 < 1 s for one run, >= 20 runs/s at 500 runs, RSS <= 1.5x the no-op operator's.
The emulator (kmock, in this process) is part of what is measured: a real API server is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "operator"), str(REPO / "trainer")]

import kmock  # noqa: E402

from tests.support.builders import make_run  # noqa: E402
from tests.support.kube.cluster import die_with_parent, path, write_kubeconfig  # noqa: E402
from tests.support.kube.emulator import ApiServer, AuditEntry, declare_resources  # noqa: E402


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Watcher:
    """Hooks into the emulator: when each run's first child arrived and when its status said Collecting."""

    def __init__(self, api: ApiServer) -> None:
        self.first_child: dict[tuple[str, str], float] = {}
        self.posted: dict[tuple[str, str], float] = {}
        self.collecting: dict[tuple[str, str], float] = {}
        self.waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        api.listeners.append(self.on_write)

    def on_write(self, entry: AuditEntry, request: Any) -> None:
        now = time.perf_counter()
        data = request.data if isinstance(request.data, dict) else {}
        if entry.verb == "create" and entry.resource == "distillery.dev/distillationruns":
            self.posted[(entry.namespace, (data.get("metadata") or {}).get("name"))] = now
        if entry.verb == "create" and entry.resource in ("configmaps", "batch/jobs"):
            run = (data.get("metadata") or {}).get("labels", {}).get("distillery.dev/run")
            if run:
                self.first_child.setdefault((entry.namespace, run), now)
        status = data.get("status") or {}
        if entry.resource == "distillery.dev/distillationruns/status" and status.get("phase") == "Collecting":
            key = (entry.namespace, request.name)
            self.collecting.setdefault(key, now)
            waiter = self.waiters.get(key)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def expect(self, key: tuple[str, str]) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        if key in self.collecting:
            future.set_result(None)
        self.waiters[key] = future
        return future


def run_body(name: str, namespace: str) -> dict[str, Any]:
    return make_run(name, namespace).storage().spec({"collection": {"shards": 4}}).obj()


async def post(server: kmock.Server, body: dict[str, Any]) -> None:
    async with server.client.post(path("DistillationRun", body["metadata"]["namespace"]), json=body) as resp:
        if resp.status not in (200, 201):
            raise RuntimeError(f"POST failed: {resp.status} {await resp.text()}")


async def post_all(server: kmock.Server, bodies: list[dict[str, Any]], concurrency: int = 64) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> None:
        async with sem:
            await post(server, body)

    await asyncio.gather(*(one(b) for b in bodies))


async def start(cmd: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    handle = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=handle, stderr=handle, preexec_fn=die_with_parent
    )
    handle.close()
    return proc


async def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    async with ApiServer() as api, kmock.Server(api) as server:
        declare_resources(api)
        namespaces = {"bench-latency"} | {f"bench-{n}" for n in sizes}
        api.namespaces |= namespaces
        watcher = Watcher(api)
        kubeconfig = write_kubeconfig(workdir / "kubeconfig.yaml", str(server.url).rstrip("/"))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "operator"), str(REPO / "trainer"), env.get("PYTHONPATH", "")]
        )
        profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
        ours = await start(
            [sys.executable, *profile, "-m", "distillery_operator.cli", "operator", "-A"],
            env,
            workdir / "operator.log",
        )
        noop = await start(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "--standalone",
                "-A",
                "--quiet",
                str(REPO / "bench/noop_operator.py"),
            ],
            env,
            workdir / "noop.log",
        )
        try:
            deadline = time.monotonic() + 60
            while {e.resource for e in api.audit if e.verb == "watch"} < {
                "distillery.dev/distillationruns",
                "pods",
                "batch/jobs",
            }:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the operators did not start; see {workdir}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            baseline = {"distillery": rss_kib(ours.pid), "no-op kopf": rss_kib(noop.pid)}
            print(
                f"# operator benchmark (emulator: kmock {kmock.__version__}, this process; logs in {workdir})"
            )
            print(
                f"idle RSS: distillery {baseline['distillery'][0] / 1024:.1f} MiB, "
                f"no-op kopf {baseline['no-op kopf'][0] / 1024:.1f} MiB"
            )

            # Latency: one run at a time.
            latencies: list[float] = []
            for i in range(args.latency_samples):
                body = run_body(f"lat-{i:03d}", "bench-latency")
                key = ("bench-latency", body["metadata"]["name"])
                done = watcher.expect(key)
                t0 = time.perf_counter()
                await post(server, body)
                await asyncio.wait_for(done, 30)
                latencies.append(watcher.first_child[key] - t0)
                await asyncio.sleep(0.05)
            p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
            print(
                f"apply -> first child ({len(latencies)} runs, one at a time): "
                f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (goal p95 < 1000 ms)"
            )

            # Throughput: N runs at once.
            rows = []
            for n in sizes:
                ns = f"bench-{n}"
                bodies = [run_body(f"run-{i:04d}", ns) for i in range(n)]
                waiters = [watcher.expect((ns, b["metadata"]["name"])) for b in bodies]
                cpu0 = (cpu_seconds(ours.pid), cpu_seconds(noop.pid), time.process_time())
                t0 = time.perf_counter()
                await post_all(server, bodies)
                await asyncio.wait_for(asyncio.gather(*waiters), 600)
                elapsed = time.perf_counter() - t0
                cpu = (
                    cpu_seconds(ours.pid) - cpu0[0],
                    cpu_seconds(noop.pid) - cpu0[1],
                    time.process_time() - cpu0[2],
                )
                await asyncio.sleep(0.5)
                mem = {"distillery": rss_kib(ours.pid), "no-op kopf": rss_kib(noop.pid)}
                rows.append((n, elapsed, n / elapsed, mem))
                print(
                    f"{n:>4} runs at once: reconciled in {elapsed:6.2f} s = {n / elapsed:6.1f} runs/s; "
                    f"RSS distillery {mem['distillery'][0] / 1024:6.1f} MiB (peak {mem['distillery'][1] / 1024:.1f}), "
                    f"no-op kopf {mem['no-op kopf'][0] / 1024:6.1f} MiB (peak {mem['no-op kopf'][1] / 1024:.1f}), "
                    f"ratio {mem['distillery'][0] / mem['no-op kopf'][0]:.2f}x; CPU s: distillery {cpu[0]:.1f}, "
                    f"no-op {cpu[1]:.1f}, emulator {cpu[2]:.1f}"
                )
            last = rows[-1][3]
            print(
                f"summary: p95 {p95 * 1000:.0f} ms; {rows[-1][2]:.1f} runs/s at {rows[-1][0]} runs; "
                f"RSS {last['distillery'][0] / 1024:.1f} MiB vs {last['no-op kopf'][0] / 1024:.1f} MiB "
                f"= {last['distillery'][0] / last['no-op kopf'][0]:.2f}x the no-op operator "
                f"(peak {last['distillery'][1] / last['no-op kopf'][1]:.2f}x)"
            )
            ns = f"bench-{rows[-1][0]}"
            posted = {k: v for k, v in watcher.posted.items() if k[0] == ns}
            t0 = min(posted.values())
            for label, marks in (
                ("posted", posted),
                ("first child", watcher.first_child),
                ("Collecting", watcher.collecting),
            ):
                times = [v - t0 for k, v in marks.items() if k[0] == ns]
                print(
                    f"  {rows[-1][0]} runs, {label:<11} after the first POST: p10 {percentile(times, 0.1):5.2f} s, "
                    f"p50 {percentile(times, 0.5):5.2f} s, p90 {percentile(times, 0.9):5.2f} s, last {max(times):5.2f} s"
                )
        finally:
            for proc in (ours, noop):
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 15)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-samples", type=int, default=40)
    parser.add_argument("--sizes", default="1,100,500")
    parser.add_argument("--profile", metavar="FILE", help="profile the operator with cProfile into FILE")
    sys.exit(asyncio.run(main(parser.parse_args())))
