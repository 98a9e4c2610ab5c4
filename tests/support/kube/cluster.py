"""A test cluster: the emulator over real HTTP, the operator as a real process, and the controllers the
emulator lacks (Job, PyTorchJob, Kubeflow Trainer's TrainJob, Deployment), played by the test through the
same HTTP API.

The test side writes only over HTTP (so the operator sees real watch events) and reads the emulator's
store directly (assertions need no round trip).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import yaml

from .emulator import ApiServer

PATHS = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "Job": ("batch/v1", "jobs"),
    "Deployment": ("apps/v1", "deployments"),
    "PyTorchJob": ("kubeflow.org/v1", "pytorchjobs"),
    "TrainJob": ("trainer.kubeflow.org/v1alpha1", "trainjobs"),
    "ClusterTrainingRuntime": ("trainer.kubeflow.org/v1alpha1", "clustertrainingruntimes"),
    "DistillationRun": ("distillery.dev/v1alpha1", "distillationruns"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
}
CHILD_KINDS = ("ConfigMap", "Service", "Job", "Deployment", "PyTorchJob", "TrainJob")
CLUSTER_SCOPED = ("ClusterTrainingRuntime",)
RUN_LABEL = "distillery.dev/run"


def path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    api_version, plural = PATHS[kind]
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    out = f"{root}/{plural}" if kind in CLUSTER_SCOPED else f"{root}/namespaces/{namespace}/{plural}"
    return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGKILL when the test process dies (no stray operators)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pod_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)[:5]}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_kubeconfig(target: Path, server: str) -> Path:
    target.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "emulator",
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "operator", "user": {"token": "test-token"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
            }
        ),
        encoding="utf-8",
    )
    return target


@dataclass
class Cluster:
    api: ApiServer
    server: kmock.Server
    workdir: Path
    operators: list[Operator] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.server.client

    # ------------------------------------------------------------------------------------------ reading

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        api_version, plural = PATHS[kind]
        for (res, ns, n), obj in self.api.objects.items():
            if (
                res.plural == plural
                and f"{res.group}/{res.version}".lstrip("/") == api_version
                and (ns, n)
                == (
                    namespace,
                    name,
                )
            ):
                return None if obj.deleted else dict(obj.raw)
        return None

    def objects(self, kind: str, namespace: str | None = None) -> Iterator[dict[str, Any]]:
        api_version, plural = PATHS[kind]
        for (res, ns, _), obj in list(self.api.objects.items()):
            if res.plural != plural or f"{res.group}/{res.version}".lstrip("/") != api_version:
                continue
            if obj.deleted or (namespace is not None and ns != namespace):
                continue
            yield dict(obj.raw)

    def children(self, namespace: str, run: str) -> dict[tuple[str, str], dict[str, Any]]:
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for kind in CHILD_KINDS:
            for obj in self.objects(kind, namespace):
                if (obj["metadata"].get("labels") or {}).get(RUN_LABEL) == run:
                    out[(kind, obj["metadata"]["name"])] = obj
        return out

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.get("DistillationRun", namespace, name) or {}
        return dict(obj.get("status") or {})

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [
            e for e in self.objects("Event", namespace) if (e.get("involvedObject") or {}).get("name") == name
        ]

    def creations(self, kind: str, namespace: str, name: str) -> int:
        """How many times the object was created (a deleted-and-recreated child counts twice)."""
        api_version, plural = PATHS[kind]
        for (res, ns, n), obj in self.api.objects.items():
            if res.plural == plural and (ns, n) == (namespace, name):
                history = list(obj.history)
                return sum(
                    1 for i, v in enumerate(history) if v is not None and (i == 0 or history[i - 1] is None)
                )
        return 0

    async def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                tails = "\n".join(op.tail() for op in self.operators)
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")
            await asyncio.sleep(0.05)

    async def wait_phase(
        self, namespace: str, name: str, phase: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.wait_for(
            lambda: (s := self.status(namespace, name)).get("phase") == phase and s,
            f"{namespace}/{name} to reach phase {phase} (now {self.status(namespace, name).get('phase')})",
            timeout,
        )
        return result

    # ------------------------------------------------------------------------------------------ writing

    async def request(self, method: str, url: str, body: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.http.request(method, url, json=body, headers=headers) as resp:
            data = await resp.json()
            assert resp.status in ok, f"{method} {url}: {resp.status} {data}"
            return data

    async def apply_run(self, run: dict[str, Any]) -> dict[str, Any]:
        ns = run["metadata"].get("namespace", "default")
        result: dict[str, Any] = await self.request("POST", path("DistillationRun", ns), run)
        return result

    async def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        await self.request("PATCH", path("DistillationRun", namespace, name), {"spec": spec})

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.request("PATCH", path(kind, namespace, name, "status"), {"status": status})

    async def create_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        *,
        message: dict[str, Any] | str | None,
        exit_code: int = 0,
        annotations: dict[str, str] | None = None,
        container: str = "main",
        owner: dict[str, Any] | None = None,
    ) -> None:
        """A pod that ran and terminated with ``message`` (what a stage writes to /dev/termination-log),
        owned by ``owner`` (the Job or PyTorchJob that made it), as its controller would create it."""
        await self.request("POST", path("Pod", namespace), _pod(name, labels, annotations, container, owner))
        await self.end_pod(namespace, name, container, message=message, exit_code=exit_code)

    async def end_pod(
        self,
        namespace: str,
        name: str,
        container: str,
        *,
        message: dict[str, Any] | str | None,
        exit_code: int = 0,
    ) -> None:
        """The pod's container exits, leaving ``message`` as its termination message."""
        text = message if isinstance(message, str) else json.dumps(message) if message is not None else ""
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "message": text,
            "finishedAt": now(),
        }
        await self.patch_status(
            "Pod",
            namespace,
            name,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [{"name": container, "state": {"terminated": terminated}}],
            },
        )

    async def start_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        *,
        container: str,
        annotations: dict[str, str] | None = None,
        owner: dict[str, Any] | None = None,
    ) -> None:
        """A pod whose container runs (and prints to its log: :meth:`write_log`)."""
        await self.request("POST", path("Pod", namespace), _pod(name, labels, annotations, container, owner))
        await self.patch_status(
            "Pod",
            namespace,
            name,
            {
                "phase": "Running",
                "containerStatuses": [{"name": container, "state": {"running": {"startedAt": now()}}}],
            },
        )

    def write_log(self, namespace: str, pod: str, container: str, *lines: str) -> None:
        """The container prints ``lines`` (read back through GET pods/log; no watch event, as in a cluster)."""
        self.api.write_log(namespace, pod, container, "".join(line + "\n" for line in lines))

    # ------------------------------------------------------------------------------------------ controllers

    def template_labels(self, kind: str, namespace: str, name: str) -> dict[str, str]:
        obj = self.get(kind, namespace, name)
        assert obj is not None, f"{kind} {namespace}/{name} does not exist"
        if kind == "PyTorchJob":
            return dict(obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"])
        return dict(obj["spec"]["template"]["metadata"]["labels"])

    async def finish_collection(
        self,
        namespace: str,
        run: str,
        summaries: list[dict[str, Any]],
        *,
        failed: dict[int, str] | None = None,
    ) -> None:
        """Play the Job controller: one pod per shard, then the Job's terminal condition."""
        job = f"{run}-collect"
        failed = failed or {}
        for summary in summaries:
            await self.create_shard_pod(namespace, job, summary["shard"], message=summary)
        for shard, log in failed.items():
            await self.create_shard_pod(namespace, job, shard, message=log, exit_code=1)
        if failed:
            indexes = ",".join(str(s) for s in sorted(failed))
            await self.patch_status(
                "Job",
                namespace,
                job,
                {
                    "startTime": now(),
                    "failed": len(failed),
                    "succeeded": len(summaries),
                    "failedIndexes": indexes,
                    "conditions": [
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "FailedIndexes",
                            "message": "Job has failed indexes",
                            "lastTransitionTime": now(),
                        }
                    ],
                },
            )
            return
        await self.complete_job(namespace, job, succeeded=len(summaries))

    async def create_shard_pod(
        self, namespace: str, job: str, shard: int, *, message: Any, exit_code: int = 0
    ) -> None:
        """A pod of an Indexed Job, as the Job controller makes it."""
        index = {"batch.kubernetes.io/job-completion-index": str(shard)}
        await self.create_pod(
            namespace,
            pod_name(f"{job}-{shard}"),
            {**self.template_labels("Job", namespace, job), **index},
            message=message,
            exit_code=exit_code,
            annotations=index,
            owner=self.get("Job", namespace, job),
        )

    async def complete_job(self, namespace: str, job: str, succeeded: int = 1) -> None:
        await self.patch_status(
            "Job",
            namespace,
            job,
            {
                "startTime": now(),
                "completionTime": now(),
                "succeeded": succeeded,
                "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now()}],
            },
        )

    def master_labels(self, namespace: str, run: str) -> dict[str, str]:
        return {
            **self.template_labels("PyTorchJob", namespace, f"{run}-train"),
            "training.kubeflow.org/replica-type": "master",
            "training.kubeflow.org/replica-index": "0",
        }

    async def start_training(self, namespace: str, run: str) -> str:
        """Play the training operator: the PyTorchJob's master pod runs (its name is returned)."""
        job = f"{run}-train"
        name = f"{job}-master-0"  # the training operator's naming: <job>-master-<index>
        owner = self.get("PyTorchJob", namespace, job)
        await self.start_pod(
            namespace, name, self.master_labels(namespace, run), container="pytorch", owner=owner
        )
        await self.patch_status(
            "PyTorchJob",
            namespace,
            job,
            {"startTime": now(), "conditions": [{"type": "Running", "status": "True"}]},
        )
        return name

    async def start_shard_pod(self, namespace: str, job: str, shard: int) -> str:
        """A running pod of an Indexed Job, as the Job controller makes it (its name is returned)."""
        index = {"batch.kubernetes.io/job-completion-index": str(shard)}
        name = pod_name(f"{job}-{shard}")
        await self.start_pod(
            namespace,
            name,
            {**self.template_labels("Job", namespace, job), **index},
            container=self.get("Job", namespace, job)["spec"]["template"]["spec"]["containers"][0]["name"],
            annotations=index,
            owner=self.get("Job", namespace, job),
        )
        return name

    async def finish_training(
        self, namespace: str, run: str, progress: dict[str, Any], *, started: str
    ) -> None:
        """Play the training operator: the master pod reports, the PyTorchJob succeeds."""
        job = f"{run}-train"
        await self.create_pod(
            namespace,
            pod_name(f"{job}-master-0"),
            self.master_labels(namespace, run),
            message=progress,
            container="pytorch",
            owner=self.get("PyTorchJob", namespace, job),
        )
        await self.patch_status(
            "PyTorchJob",
            namespace,
            job,
            {
                "startTime": started,
                "completionTime": now(),
                "conditions": [
                    {"type": "Created", "status": "True"},
                    {"type": "Running", "status": "False"},
                    {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"},
                ],
            },
        )

    # Kubeflow Trainer v2 (the TrainJob controller and JobSet, played: the pods of the TrainJob's JobSet
    # carry the labels its runtimePatches ask for; its conditions are Complete, Failed and Suspended).

    async def create_runtime(self, name: str) -> None:
        """A ClusterTrainingRuntime, as Kubeflow Trainer's manifests install it (the parts that matter)."""
        runtime = {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "ClusterTrainingRuntime",
            "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}},
        }
        await self.request("POST", path("ClusterTrainingRuntime", ""), runtime)

    def node_labels(self, namespace: str, run: str) -> dict[str, str]:
        """The labels of the TrainJob's node pods: its runtime patch's, and JobSet's own."""
        obj = self.get("TrainJob", namespace, f"{run}-train")
        assert obj is not None, f"TrainJob {namespace}/{run}-train does not exist"
        (patch,) = obj["spec"]["runtimePatches"]
        (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        labels = dict(node["template"]["spec"]["template"]["metadata"]["labels"])
        return {
            **labels,
            "jobset.sigs.k8s.io/jobset-name": f"{run}-train",
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
        }

    async def start_trainjob(self, namespace: str, run: str) -> str:
        """Play the Trainer and JobSet: rank 0's pod (completion index 0 of the node Job) runs."""
        index = {"batch.kubernetes.io/job-completion-index": "0"}
        name = pod_name(f"{run}-train-node-0-0")
        await self.start_pod(
            namespace,
            name,
            {**self.node_labels(namespace, run), **index},
            container="node",
            annotations=index,
        )
        return name

    async def trainjob_conditions(self, namespace: str, run: str, *conditions: dict[str, Any]) -> None:
        """The TrainJob controller writes its conditions."""
        stamped = [{"lastTransitionTime": now(), **c} for c in conditions]
        await self.patch_status("TrainJob", namespace, f"{run}-train", {"conditions": stamped})

    async def finish_trainjob(self, namespace: str, run: str, progress: dict[str, Any]) -> None:
        """Rank 0 reports and the TrainJob completes (its JobSet did)."""
        index = {"batch.kubernetes.io/job-completion-index": "0"}
        await self.create_pod(
            namespace,
            pod_name(f"{run}-train-node-0-0"),
            {**self.node_labels(namespace, run), **index},
            message=progress,
            annotations=index,
            container="node",
        )
        await self.trainjob_conditions(
            namespace,
            run,
            {
                "type": "Complete",
                "status": "True",
                "reason": "JobSetCompleted",
                "message": "jobset completed",
            },
        )

    async def roll_out(self, namespace: str, name: str) -> None:
        """Play the Deployment controller: every replica of the current generation is ready."""
        dep = self.get("Deployment", namespace, name)
        assert dep is not None, f"Deployment {namespace}/{name} does not exist"
        replicas = dep["spec"]["replicas"]
        await self.patch_status(
            "Deployment",
            namespace,
            name,
            {
                "observedGeneration": dep["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
            },
        )

    async def finish_evaluation(self, namespace: str, run: str, results: dict[str, Any]) -> None:
        job = f"{run}-eval"
        labels = self.template_labels("Job", namespace, job)
        await self.create_pod(
            namespace,
            pod_name(job),
            labels,
            message=results,
            container="evaluate",
            owner=self.get("Job", namespace, job),
        )
        await self.complete_job(namespace, job)


def _pod(
    name: str,
    labels: dict[str, str],
    annotations: dict[str, str] | None,
    container: str,
    owner: dict[str, Any] | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels, "annotations": annotations or {}}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": container, "image": "trainer"}]},
    }


@dataclass
class Operator:
    """``distillery operator`` as a user runs it, against the emulator."""

    kubeconfig: Path
    log: Path
    args: tuple[str, ...] = ("-A",)
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> Operator:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "DISTILLERY_RESULTS_GRACE_SECONDS": "10",
            **self.env,
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        handle = self.log.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "distillery_operator.cli",
            "operator",
            "--verbose",
            *self.args,
            env=env,
            stdout=handle,
            stderr=handle,
            preexec_fn=die_with_parent,
        )
        handle.close()
        return self

    async def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no goodbye; what a crashed pod does."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                await self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "--- operator log ---\n" + "\n".join(text.splitlines()[-lines:])
