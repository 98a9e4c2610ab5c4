"""The chart rendered by the real ``helm`` (and checked by the real ``kubectl``), as Python objects."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

CHART = REPO / "charts" / "distillery"
RELEASE = "distillery"
NAMESPACE = "distillery-system"


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path

    def run(
        self, *args: str | Path, cwd: Path = REPO, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout}{out.stderr}"
            )
        return out


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def operator_container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
        return container

    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in self.operator_container().get("env") or ()}


def _set_args(values: Mapping[str, Any] | None, tmp: Path) -> list[str]:
    if not values:
        return []
    path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(dict(values)), encoding="utf-8")
    return ["-f", str(path)]


def render(
    tools: Tools, tmp: Path, values: Mapping[str, Any] | None = None, *, crds: bool = False
) -> Rendered:
    """``helm template`` (the objects) and ``helm install --dry-run`` (NOTES.txt has no other way out)."""
    extra = _set_args(values, tmp)
    objects = template(tools, tmp, values, crds=crds)
    dry = tools.run(
        tools.helm, "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", *extra
    )
    notes = dry.stdout.split("NOTES:\n", 1)[1] if "NOTES:\n" in dry.stdout else ""
    return Rendered(objects, notes)


def template(
    tools: Tools,
    tmp: Path,
    values: Mapping[str, Any] | None = None,
    *,
    namespace: str = NAMESPACE,
    release: str = RELEASE,
    crds: bool = False,
) -> list[dict[str, Any]]:
    """The objects ``helm template <release> -n <namespace>`` renders."""
    args = ["template", release, CHART, "--namespace", namespace, *_set_args(values, tmp)]
    if crds:
        args.append("--include-crds")
    out = tools.run(tools.helm, *args)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def walk(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted.path, value)`` of a YAML tree, mappings descended into."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            sub = f"{path}.{key}" if path else str(key)
            yield sub, value
            yield from walk(value, sub)
