"""Live progress while a stage runs, against the API emulator with the real operator process: the test plays
the training operator and the Job controller (pods that run, then end) and the stage processes themselves
(the progress lines they print to their logs); the operator reads them through GET pods/log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import kmock
import pytest
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.progress_line import format_line

from tests.support.builders import make_run
from tests.support.kube.cluster import Cluster, path
from tests.support.kube.emulator import ApiServer, declare_resources, rbac_rules
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac
from tests.support.reports import progress, summaries

pytestmark = pytest.mark.slow

NS = "ns-1"
INTERVAL = 0.5  # seconds between two reads of a run's logs (30 in a cluster)
FAST = {"DISTILLERY_PROGRESS_INTERVAL_SECONDS": str(INTERVAL)}


def step(n: int, total: int = 90, **kw: Any) -> str:
    report = TrainingProgress.model_validate(
        {
            "method": "sft",
            "step": n,
            "total_steps": total,
            "epoch": round(2 * n / total, 4),
            "loss": round(2.5 - n / 50, 4),
            "tokens_per_second": 5120.0,
            "eta_seconds": float((total - n) * 3),
            "elapsed_seconds": float(n * 3),
            "world_size": 8,
            "gpus": 8,
            "gpu_hours": round(8 * n * 3 / 3600, 6),
            **kw,
        }
    )
    return format_line("train", report)


def training(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(cluster.status(NS, name).get("training") or {})


async def to_training(cluster: Cluster, name: str) -> str:
    """Collection done, the PyTorchJob made; its master pod runs: returns the pod's name."""
    await cluster.apply_run(make_run(name, NS).storage().obj())
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{name}-collect"), "the collection Job")
    await cluster.finish_collection(NS, name, summaries(1))
    await cluster.wait_for(lambda: cluster.get("PyTorchJob", NS, f"{name}-train"), "the PyTorchJob")
    master = await cluster.start_training(NS, name)
    await cluster.wait_phase(NS, name, "Training")
    return master


async def test_training_status_follows_rank_zeros_log_while_it_runs(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator(env=FAST)
    master = await to_training(cluster, "live")
    cluster.write_log(
        NS, master, "pytorch", "rank0 INFO loading the student", step(12), "rank1 INFO step done"
    )
    tr = await cluster.wait_for(
        lambda: (t := training(cluster, "live")).get("step") == 12 and t, "step 12 from the master's log"
    )
    assert (tr["done"], tr["total"], tr["etaSeconds"], tr["loss"]) == (12, 90, 234.0, 2.26)
    assert (tr["tokensPerSecond"], tr["epoch"], tr["state"]) == (5120.0, 0.2667, "Running")
    assert tr["message"] == "sft step 12/90, loss 2.26"
    assert cluster.status(NS, "live")["phase"] == "Training"

    # The log moves; garbage and a torn line in between change nothing; the status follows the latest line.
    cluster.write_log(NS, master, "pytorch", "Traceback? no: a warning", step(30), step(31)[:40])
    tr = await cluster.wait_for(
        lambda: (t := training(cluster, "live")).get("step") == 30 and t, "step 30 from the master's log"
    )
    assert tr["etaSeconds"] == 180.0 and tr["message"] == "sft step 30/90, loss 1.9"

    # No storm: a quiet log costs one read per interval and no status write.
    await asyncio.sleep(INTERVAL)  # the write for step 30 is done
    reads = cluster.api.count("get", "pods/log")
    writes = cluster.api.count("patch", "distillery.dev/distillationruns/status")
    started = time.monotonic()
    await asyncio.sleep(6 * INTERVAL)
    elapsed = time.monotonic() - started
    assert 2 <= cluster.api.count("get", "pods/log") - reads <= elapsed / INTERVAL + 1
    assert cluster.api.count("patch", "distillery.dev/distillationruns/status") == writes

    # The master ends: its termination message is the final report; the logs are no longer read.
    final = progress(gpu_hours=2.5)
    await cluster.end_pod(NS, master, "pytorch", message=final)
    await cluster.patch_status(
        "PyTorchJob",
        NS,
        "live-train",
        {"conditions": [{"type": "Succeeded", "status": "True"}], "completionTime": "2026-01-01T01:00:00Z"},
    )
    status = await cluster.wait_phase(NS, "live", "Serving")
    assert status["training"]["step"] == 300 and status["training"]["state"] == "Succeeded"
    assert "etaSeconds" not in status["training"] and status["training"]["gpuHours"] == 2.5
    reads = cluster.api.count("get", "pods/log")
    await asyncio.sleep(3 * INTERVAL)
    assert cluster.api.count("get", "pods/log") == reads

    assert beyond_rbac(cluster.api.audit) == {}
    assert rbac_rules([e for e in cluster.api.audit if e.agent == "distillery-operator"])["pods/log"] == {
        "get"
    }


async def test_without_leave_to_read_logs_the_run_goes_on_and_says_so_once(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    op = await start_operator(env=FAST)
    cluster.api.inject("get", "pods/log", 403, times=1000)
    master = await to_training(cluster, "nolog")
    cluster.write_log(NS, master, "pytorch", step(12))
    await cluster.wait_for(lambda: cluster.api.count("get", "pods/log") >= 4, "a few tries to read the log")
    status = cluster.status(NS, "nolog")
    assert status["phase"] == "Training" and status["training"].get("step", 0) == 0
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"
    assert [e["reason"] for e in cluster.events(NS, "nolog") if e["type"] == "Warning"] == []
    log = op.log.read_text(encoding="utf-8")
    assert log.count("grant get on pods/log") == 1 and "internal error" not in log

    # The report still arrives when the master ends, and the run goes on.
    await cluster.end_pod(NS, master, "pytorch", message=progress())
    await cluster.patch_status(
        "PyTorchJob", NS, "nolog-train", {"conditions": [{"type": "Succeeded", "status": "True"}]}
    )
    status = await cluster.wait_phase(NS, "nolog", "Serving")
    assert status["training"]["step"] == 300


async def test_with_live_progress_off_no_log_is_ever_read(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    """The chart's operator.liveProgress: false grants no get on pods/log and tells the operator so
    (DISTILLERY_LIVE_PROGRESS=false): it does not try, so no 403 is ever met or warned about."""
    op = await start_operator(env={**FAST, "DISTILLERY_LIVE_PROGRESS": "false"})
    master = await to_training(cluster, "quiet")
    cluster.write_log(NS, master, "pytorch", step(12))
    await asyncio.sleep(8 * INTERVAL)
    assert cluster.api.count("get", "pods/log") == 0
    assert cluster.status(NS, "quiet")["training"].get("step", 0) == 0
    await cluster.end_pod(NS, master, "pytorch", message=progress())
    await cluster.patch_status(
        "PyTorchJob", NS, "quiet-train", {"conditions": [{"type": "Succeeded", "status": "True"}]}
    )
    status = await cluster.wait_phase(NS, "quiet", "Serving")
    assert status["training"]["step"] == 300
    assert "pods/log" not in op.log.read_text(encoding="utf-8")


async def test_collection_sums_answers_over_finished_and_running_shards(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator("--namespace", NS, env=FAST)  # a namespaced operator: its Role grants pods/log
    await cluster.apply_run(make_run("shards", NS).storage().spec({"collection": {"shards": 3}}).obj())
    await cluster.wait_for(lambda: cluster.get("Job", NS, "shards-collect"), "the collection Job")
    reports = summaries(3)
    await cluster.create_shard_pod(NS, "shards-collect", 0, message=reports[0])
    one = await cluster.start_shard_pod(NS, "shards-collect", 1)
    two = await cluster.start_shard_pod(NS, "shards-collect", 2)
    for shard, pod, done in ((1, one, 500), (2, two, 200)):
        summary = CollectionSummary(
            shard=shard, shards=3, total=1500, done=done, failed=1, prompts_per_second=10
        )
        cluster.write_log(NS, pod, "collect", "INFO shard started", format_line("collect", summary))

    def collection() -> dict[str, Any]:
        return dict(cluster.status(NS, "shards").get("collection") or {})

    st = await cluster.wait_for(
        lambda: (c := collection()).get("total") == 4500 and c, "answers summed over the shards"
    )
    assert (st["done"], st["failed"], st["state"]) == (1498 + 500 + 200, 2 + 1 + 1, "Running")
    assert st["etaSeconds"] == (1500 - 200 - 1) / 10  # the slowest running shard
    assert st["message"] == "1/3 shards done; 2198/4500 answered"

    more = CollectionSummary(shard=1, shards=3, total=1500, done=900, failed=1, prompts_per_second=10)
    cluster.write_log(NS, one, "collect", format_line("collect", more))
    st = await cluster.wait_for(
        lambda: (c := collection()).get("done") == 1498 + 900 + 200 and c, "shard 1 moves"
    )

    # Every shard ends: the Job completes with the shards' own reports, and training starts.
    await cluster.end_pod(NS, one, "collect", message=reports[1])
    await cluster.end_pod(NS, two, "collect", message=reports[2])
    await cluster.complete_job(NS, "shards-collect", succeeded=3)
    status = await cluster.wait_phase(NS, "shards", "Training")
    assert status["collection"]["done"] == 3 * 1498 and status["collection"]["total"] == 4500
    assert beyond_rbac(cluster.api.audit) == {}


async def test_the_emulator_serves_a_containers_log_as_the_api_server_does(tmp_path: Path) -> None:
    async with ApiServer() as api, kmock.Server(api) as server:
        declare_resources(api)
        cluster = Cluster(api, server, tmp_path)
        url = cluster.url + path("Pod", NS, "p", "log")

        async def get(**params: str) -> tuple[int, str]:
            async with cluster.http.get(url, params=params) as resp:
                return resp.status, await resp.text()

        assert (await get())[0] == 404
        await cluster.request(
            "POST", path("Pod", NS), {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
        )
        status, text = await get()
        assert status == 400 and "waiting to start" in text
        await cluster.patch_status(
            "Pod",
            NS,
            "p",
            {"phase": "Running", "containerStatuses": [{"name": "c", "state": {"running": {}}}]},
        )
        assert await get() == (200, "")
        cluster.write_log(NS, "p", "c", "one", "two", "three")
        assert await get(container="c") == (200, "one\ntwo\nthree\n")
        assert await get(tailLines="2") == (200, "two\nthree\n")
        assert await get(tailLines="2", limitBytes="5") == (200, "two\nt")
        status, text = await get(container="other")
        assert status == 400 and "other" in text and "is not valid for pod p" in text
        assert api.count("get", "pods/log") == 7
