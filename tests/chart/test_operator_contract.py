"""The chart and the operator agree: the flags the chart renders parse with `distillery operator`, every
DISTILLERY_* variable it sets is a setting the operator reads, and the operator started exactly as the
chart starts it answers the probes on the port the chart probes and serves metrics where the chart's
Service and ServiceMonitor look for them."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .helm import Tools, render
from .scenarios import EVERYTHING, GPU_KUEUE


def _parse(args: list[str]) -> Any:
    from distillery_operator.cli import build_parser

    return build_parser().parse_args(["operator", *args])


def test_the_chart_flags_parse_with_the_operator_cli(k8s_tools: Tools, tmp_path: Path) -> None:
    parsed = _parse(render(k8s_tools, tmp_path).operator_container()["args"])
    assert parsed.all_namespaces and not parsed.namespace and parsed.verbose
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    assert parsed.metrics is None
    parsed = _parse(render(k8s_tools, tmp_path, EVERYTHING).operator_container()["args"])
    assert parsed.namespace == ["team-a", "team-b"] and parsed.debug
    assert parsed.liveness == "http://0.0.0.0:9000/healthz"
    assert parsed.metrics == "http://0.0.0.0:9001/metrics"


def test_every_variable_the_chart_sets_is_a_setting_the_operator_reads(
    k8s_tools: Tools, tmp_path: Path
) -> None:
    from distillery_operator.settings import Settings

    env = render(k8s_tools, tmp_path, GPU_KUEUE).env()
    base = Settings.from_env({})
    unread = [name for name, value in env.items() if Settings.from_env({name: value}) == base]
    # The defaults (pull policy IfNotPresent) may equal the operator's own; GPU_KUEUE sets others.
    assert not unread, f"the chart sets variables the operator ignores: {unread}"
    settings = Settings.from_env(env)
    assert settings.queue_name == "team-a-gpus"
    assert settings.storage_class == "fast-rwx"
    assert settings.training_runtime == "torch-tuned"
    assert settings.trainer_image == "registry.example/distillery-trainer:0.1.0"
    assert settings.vllm_image == "registry.example/vllm-openai:v0.32.0"
    assert dict(settings.node_selector) == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert [dict(t) for t in settings.tolerations] == GPU_KUEUE["workloads"]["tolerations"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(port: int, path: str, timeout: float = 30.0) -> tuple[int, str]:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    return resp.status, await resp.text()
            except aiohttp.ClientConnectionError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("values", [{}, {"rbac": {"scope": "namespaced", "watchNamespaces": ["team-a"]}}])
async def test_the_operator_as_the_chart_starts_it_answers_the_probes(
    values: dict[str, Any], k8s_tools: Tools, tmp_path: Path, cluster: Any, start_operator: Any
) -> None:
    port, metrics_port = _free_port(), _free_port()
    monitored = {"enabled": True, "port": metrics_port, "serviceMonitor": {"enabled": True}}
    out = render(
        k8s_tools, tmp_path, {**values, "operator": {"probePort": port}, "metrics": monitored, **GPU_KUEUE}
    )
    container = out.operator_container()
    probe = container["livenessProbe"]["httpGet"]
    (named,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert named["containerPort"] == port
    await start_operator(*container["args"], env=out.env())
    status, body = await _get(port, probe["path"])
    assert status == 200 and isinstance(json.loads(body), dict)
    # Metrics: the ServiceMonitor's endpoint -> the Service's port -> the container port -> the operator.
    (endpoint,) = out.one("ServiceMonitor")["spec"]["endpoints"]
    (svc_port,) = [p for p in out.one("Service")["spec"]["ports"] if p["name"] == endpoint["port"]]
    (target,) = [p for p in container["ports"] if p["name"] == svc_port["targetPort"]]
    assert target["containerPort"] == metrics_port
    status, text = await _get(target["containerPort"], endpoint["path"])
    assert status == 200 and 'distillery_build_info{version="0.1.0"} 1' in text
    assert "# TYPE distillery_runs gauge" in text
