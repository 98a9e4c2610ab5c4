"""The real kubectl against the operator tests' API emulator: `kubectl apply` creates the example run,
and `kubectl get drun` prints the CRD's printer columns over the status the operator writes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from distillery_trainer.api.status import DistillationRunStatus, Latency, Results

from tests.conftest import EXAMPLES, REPO

from .helm import Tools

pytestmark = pytest.mark.slow

CRD = REPO / "crds" / "distillery.dev_distillationruns.yaml"


async def kubectl(tools: Tools, kubeconfig: Path, *args: str | Path) -> str:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    cache = kubeconfig.parent / "kube-cache"
    proc = await asyncio.create_subprocess_exec(
        str(tools.kubectl),
        f"--cache-dir={cache}",
        *map(str, args),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    what = f"kubectl {' '.join(map(str, args))}: {err.decode()}{out.decode()}"
    assert proc.returncode == 0 and not err, what  # no error, and no warning either
    return out.decode()


def stored(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    for (res, ns, n), obj in api.objects.items():
        if res.plural == "distillationruns" and (ns, n) == (namespace, name) and not obj.deleted:
            return dict(obj.raw)
    return None


async def test_kubectl_applies_the_example_and_get_drun_shows_the_printer_columns(
    k8s_tools: Tools, tmp_path: Path
) -> None:
    import kmock

    from tests.support.kube.cluster import write_kubeconfig
    from tests.support.kube.emulator import declare_resources

    from .kubectl_api import KubectlApiServer

    run = yaml.safe_load((EXAMPLES / "run.yaml").read_text(encoding="utf-8"))
    ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
    async with KubectlApiServer() as api, kmock.Server(api) as server:
        declare_resources(api)
        api.namespaces.add(ns)
        api.add_printer_columns(yaml.safe_load(CRD.read_text(encoding="utf-8")))
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig.yaml", str(server.url).rstrip("/"))

        out = await kubectl(k8s_tools, kubeconfig, "apply", "--validate=false", "-f", EXAMPLES / "run.yaml")
        assert f"distillationrun.distillery.dev/{name} created" in out
        obj = stored(api, ns, name)
        assert obj is not None and obj["spec"] == run["spec"]

        out = await kubectl(k8s_tools, kubeconfig, "get", "drun", "-n", ns)
        header, row = out.splitlines()
        assert header.split() == ["NAME", "PHASE", "RETENTION", "P95", "AGE"]
        assert row.split()[0] == name and len(row.split()) == 2  # no status yet: empty columns, the age

        # The status the operator writes (the API model's wire form), through the status subresource.
        status = DistillationRunStatus(
            phase="Succeeded",
            observed_generation=1,
            results=Results(quality_retention=0.91, latency_ms=Latency(p50=450.0, p95=900.0)),
        )
        url = f"/apis/distillery.dev/v1alpha1/namespaces/{ns}/distillationruns/{name}/status"
        async with server.client.patch(
            url,
            json={"status": status.to_dict()},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as resp:
            assert resp.status == 200, await resp.text()

        out = await kubectl(k8s_tools, kubeconfig, "get", "drun", "-n", ns)
        header, row = out.splitlines()
        cells = row.split()
        assert cells[:4] == [name, "Succeeded", "0.91", "900"], out
        assert cells[4].endswith(("s", "m")), out  # the age, from creationTimestamp

        out = await kubectl(
            k8s_tools, kubeconfig, "get", "distillationruns.distillery.dev", "-A", "-o", "name"
        )
        assert out.split() == [f"distillationrun.distillery.dev/{name}"]
