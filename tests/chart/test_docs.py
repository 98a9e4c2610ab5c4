"""The platform docs stay true to the chart: their YAML is valid Kubernetes, their `helm install` commands
render, their Argo CD Application renders the chart, and the RBAC table is the chart's rules."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

from .helm import CHART, Tools, render

DOCS = REPO / "docs"
PAGES = (
    "README.md",
    "install.md",
    "first-run.md",
    "gitops-argocd.md",
    "multi-tenancy.md",
    "storage.md",
    "security.md",
)
HEALTH_KEY = "resource.customizations.health.distillery.dev_DistillationRun"
# The operator's Argo CD health check: the one source of the Lua in docs/gitops-argocd.md.
OPERATOR_HEALTH_LUA = REPO / "operator" / "distillery_operator" / "health.lua"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def blocks(page: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall((DOCS / page).read_text(encoding="utf-8")) if kind == lang]


def yaml_docs(page: str) -> list[dict[str, Any]]:
    return [d for body in blocks(page, "yaml") for d in yaml.safe_load_all(body) if isinstance(d, dict)]


def test_every_page_exists_and_every_relative_link_resolves() -> None:
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        assert text.startswith("# "), page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (DOCS / target).exists(), f"{page}: broken link {target}"
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    assert all(f"({page})" in index for page in PAGES if page != "README.md")


@pytest.mark.parametrize("page", PAGES)
def test_yaml_in_the_docs_is_valid_kubernetes(page: str) -> None:
    for doc in yaml_docs(page):
        if "apiVersion" not in doc or "kind" not in doc:
            continue  # a fragment (values, a run's spec excerpt)
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["apiVersion"].split("/")[0] in {"argoproj.io", "kueue.x-k8s.io"}, doc["apiVersion"]
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{page}: {doc['kind']}: {exc}") from exc


def test_the_helm_commands_in_the_docs_render(k8s_tools: Tools, tmp_path: Path) -> None:
    commands = [
        shlex.split(line, comments=True)
        for body in blocks("install.md", "sh")
        for line in body.replace("\\\n", " ").splitlines()
        if line.startswith("helm install")
    ]
    assert len(commands) >= 2
    for args in commands:
        assert args[3] == "charts/distillery", args
        sets = [a for i, a in enumerate(args) if args[i - 1] == "--set"]
        out = k8s_tools.run(k8s_tools.helm, "template", "distillery", CHART, *(f"--set={s}" for s in sets))
        assert "kind: Deployment" in out.stdout


def test_the_argocd_application_renders_the_chart(k8s_tools: Tools, tmp_path: Path) -> None:
    apps = [d for d in yaml_docs("gitops-argocd.md") if d.get("kind") == "Application"]
    chart_app = next(a for a in apps if a["spec"]["source"].get("path") == "charts/distillery")
    helm = chart_app["spec"]["source"]["helm"]
    out = render(k8s_tools, tmp_path, helm["valuesObject"])
    roles = {r["metadata"]["namespace"] for r in out.of_kind("Role")}
    assert roles == set(helm["valuesObject"]["rbac"]["watchNamespaces"])
    assert out.env()["DISTILLERY_QUEUE_NAME"] == "distillation"
    assert "ServerSideApply=true" in chart_app["spec"]["syncPolicy"]["syncOptions"]


def argocd_health_lua() -> str:
    (cm,) = [d for d in yaml_docs("gitops-argocd.md") if d.get("kind") == "ConfigMap"]
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("argocd-cm", "argocd")
    lua: str = cm["data"][HEALTH_KEY]
    return lua


def test_the_argocd_health_snippet_is_a_lua_health_check() -> None:
    lua = argocd_health_lua()
    assert "hs.status" in lua and "return hs" in lua
    for status in ("Healthy", "Progressing", "Degraded"):
        assert f'"{status}"' in lua


@pytest.mark.skipif(
    not OPERATOR_HEALTH_LUA.exists(),
    reason="the operator's health check (operator/distillery_operator/health.lua) comes with the operator branch",
)
def test_the_argocd_health_snippet_is_the_operators_health_check() -> None:
    """One source: the docs carry the operator's Lua verbatim (its own tests run it with lupa)."""
    assert argocd_health_lua().strip() == OPERATOR_HEALTH_LUA.read_text(encoding="utf-8").strip()


def test_the_install_page_lists_exactly_the_variables_the_chart_sets() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    mapping = helpers.split('define "distillery.operatorEnv"', 1)[1].split("{{- end }}\n\n", 1)[0]
    chart_vars = set(re.findall(r"DISTILLERY_[A-Z_]+", mapping))
    documented = set(re.findall(r"DISTILLERY_[A-Z_]+", (DOCS / "install.md").read_text(encoding="utf-8")))
    assert chart_vars and documented == chart_vars


def _table_grants(page: str) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    text = (DOCS / page).read_text(encoding="utf-8")
    section = text.split("## What the operator can touch", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        verbs = {v.strip() for v in cells[1].split(",")}
        for name in re.findall(r"`([^`]+)`", cells[0]):
            first, _, rest = name.partition("/")
            named_group = rest and ("." in first or first in ("apps", "batch"))
            grants[(first, rest) if named_group else ("", name)] = verbs
    return grants


def test_the_security_page_shows_the_charts_rules(k8s_tools: Tools, tmp_path: Path) -> None:
    documented = _table_grants("security.md")
    rendered: dict[tuple[str, str], set[str]] = {}
    for values in ({}, {"rbac": {"scope": "namespaced"}}):
        out = render(k8s_tools, tmp_path, values)
        for role in out.of_kind("ClusterRole") + out.of_kind("Role"):
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        rendered.setdefault((group, resource), set()).update(rule["verbs"])
    assert documented == rendered
